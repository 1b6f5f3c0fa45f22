"""``sd35trt bench``: per-stage latency, throughput, peak memory and per-step host overhead.

- :mod:`~sd35trt.bench.benchmark`: the command (:func:`~sd35trt.bench.benchmark.bench`).
- :mod:`~sd35trt.bench.report`: the ``bench.json`` schema, its reader and its text table.
- :mod:`~sd35trt.bench.stats`: statistics (numpy) and the overhead arithmetic.
- :mod:`~sd35trt.bench.probes`: clocks and memory probes.
- :mod:`~sd35trt.bench.subjects`: what is measured (engines directories, the diffusers pipeline).
- :mod:`~sd35trt.bench.overhead`: the runtime's host overhead per step against diffusers'.

This ``__init__`` imports nothing, so reading a report (the figures do) loads no runtime.
"""
