"""Redraw ``bench.png`` from one or more ``bench.json`` files, configurations side by side.

``sd35trt bench`` already writes its PNG; this merges benches run separately (e.g. a TensorRT
bench on a GPU machine and an ONNX Runtime one on a CPU) into one figure, labelling each
configuration with its device when the devices differ.

    python scripts/plot_bench.py runs/tiny/bench/bench.json -o runs/tiny/bench/bench.png
    python scripts/plot_bench.py gpu/bench.json cpu/bench.json -o compare.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sd35trt.bench import SCHEMA, format_bench
from sd35trt.plots import merge_bench, plot_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "bench_json", nargs="+", type=Path, help="bench.json files written by `sd35trt bench`"
    )
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    results = []
    for path in args.bench_json:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"error: cannot read {path}: {err}", file=sys.stderr)
            return 1
        if data.get("schema") != SCHEMA:
            print(
                f"error: {path} is not a bench result (schema {data.get('schema')!r}, expected {SCHEMA})",
                file=sys.stderr,
            )
            return 1
        results.append(data)
    merged = merge_bench(results)
    print(format_bench(merged))
    print(f"wrote {plot_bench(merged, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
