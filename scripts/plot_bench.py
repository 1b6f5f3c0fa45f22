"""Redraw ``bench.png`` from one or more ``bench.json`` files, configurations side by side.

``sd35trt bench`` already writes its PNG; this merges benches run separately (e.g. a TensorRT
bench on a GPU machine and an ONNX Runtime one on a CPU) into one figure, labelling each
configuration with its device when the devices differ.

    python scripts/plot_bench.py runs/tiny/bench/bench.json -o runs/tiny/bench/bench.png
    python scripts/plot_bench.py gpu/bench.json cpu/bench.json -o compare.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd35trt.bench.plots import plot_bench
from sd35trt.bench.report import format_bench, merge_bench, read_bench
from sd35trt.errors import ReportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "bench_json", nargs="+", type=Path, help="bench.json files written by `sd35trt bench`"
    )
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        reports = [read_bench(path) for path in args.bench_json]
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    merged = merge_bench(reports)
    print(format_bench(merged))
    print(f"wrote {plot_bench(merged, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
