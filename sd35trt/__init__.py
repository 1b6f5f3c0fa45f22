"""sd35trt: Stable Diffusion 3.5 to FP8 TensorRT engines (calibrate, export, build, run)."""

__version__ = "0.1.0"
