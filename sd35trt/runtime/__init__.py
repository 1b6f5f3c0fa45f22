"""The thin runtime: requests, the SD3.5 denoising loop over engines, scheduler, tokenizers, PNGs."""
