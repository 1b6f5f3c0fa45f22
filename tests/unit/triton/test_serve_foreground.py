"""``sd35trt triton serve`` in the foreground: the server process never outlives it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sd35trt.triton.local import serve_foreground


class _SleepingServer:
    """LocalTritonServer's interface over a real child process that would run for a minute."""

    repository = http_url = grpc_url = metrics_url = log_path = "unused"

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.child: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> None:
        self.process = self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def stop(self) -> int | None:
        proc, self.process = self.process, None
        if proc is None:
            return None
        proc.terminate()
        return proc.wait(10)


def test_a_closed_stdout_stops_the_server_instead_of_leaving_it_running():
    """faults.md #53: with its output piped into ``head``, a failed write left tritonserver running."""
    server = _SleepingServer()

    def echo(line: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        serve_foreground(server, echo, timeout_s=5)
    assert server.process is None and server.child.poll() is not None
