"""The thin runtime: engine backends behind one interface, and the SD3.5 denoising loop."""
