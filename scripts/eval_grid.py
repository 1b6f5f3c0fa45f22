"""Redraw the grid PNG of an ``sd35trt eval`` result (reference | engines | difference per prompt).

``sd35trt eval`` already writes ``eval_grid.png``; this redraws it from ``eval.json`` and the
images saved beside it, e.g. with a fixed colour scale for the difference maps.

    python scripts/eval_grid.py runs/tiny/eval/eval.json -o runs/tiny/eval/eval_grid.png --diff-max 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd35trt.bench.eval_report import format_eval, read_eval
from sd35trt.bench.plots import plot_eval_grid
from sd35trt.errors import ReportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_json", type=Path, help="eval.json written by `sd35trt eval`")
    parser.add_argument(
        "-o", "--out", type=Path, help="PNG to write (default: eval_grid.png beside eval.json)"
    )
    parser.add_argument(
        "--diff-max", type=float, help="difference (8-bit levels) at full colour (default: the largest found)"
    )
    args = parser.parse_args(argv)
    try:
        report = read_eval(args.eval_json)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.out or args.eval_json.parent / "eval_grid.png"
    print(format_eval(report))
    print(f"wrote {plot_eval_grid(report, args.eval_json.parent, out, diff_max=args.diff_max)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
