"""``python -m sd35trt.serve --engines DIR ...``: the same server as ``sd35trt serve`` (used by
scripts/serve_throughput.py, which runs servers as child processes)."""

from __future__ import annotations

import argparse
import os
import sys

from sd35trt.errors import Sd35TrtError
from sd35trt.serve import ServeSettings, serve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd35trt.serve", description=__doc__)
    p.add_argument("--engines", required=True, help="engines directory (runs/<name>/engines)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--queue-size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--low-vram", action="store_true")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    try:
        settings = ServeSettings(
            host=a.host,
            port=a.port,
            max_batch=a.max_batch,
            batch_window_ms=a.batch_window_ms,
            queue_size=a.queue_size,
            timeout_s=a.timeout,
            low_vram=a.low_vram,
            log_level=a.log_level,
        )
        serve(a.engines, settings)
    except Sd35TrtError as err:
        if os.environ.get("SD35TRT_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
