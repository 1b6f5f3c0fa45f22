"""The PyTorch side: loading diffusers pipelines, the tiny model, Hub, LoRA, quantization, the reference."""
