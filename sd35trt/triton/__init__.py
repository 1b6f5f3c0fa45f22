"""``sd35trt triton``: serve the engines from NVIDIA Triton Inference Server (a model repository
whose Python-backend model runs sd35trt's runtime). Importing this package imports neither Triton
nor torch.
"""
