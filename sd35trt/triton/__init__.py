"""``sd35trt triton``: serve the engines from NVIDIA Triton Inference Server.

- :mod:`sd35trt.triton.repository` writes a model repository (``config.pbtxt``, a thin
  ``model.py``, the engines, warm-up inputs);
- :mod:`sd35trt.triton.backend` is the Python-backend model that ``model.py`` delegates to: the
  runtime, validation and batching of ``sd35trt serve``;
- :mod:`sd35trt.triton.spec` lists the model's inputs and outputs;
- :mod:`sd35trt.triton.local` starts the ``tritonserver`` bundled in ``nvidia-pytriton`` on
  127.0.0.1, for tests and benchmarks.

Importing this package imports neither Triton nor torch.
"""
