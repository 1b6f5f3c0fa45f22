"""``sd35trt bench`` and ``sd35trt eval``: latency, throughput, memory, host overhead, image quality.

This ``__init__`` imports nothing, so reading a report (the figures do) loads no runtime.
"""
