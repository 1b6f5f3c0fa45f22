"""A local ``tritonserver``: ``sd35trt triton serve``, tests and benchmarks (production: deploy/triton/).

The server is the one bundled in the ``nvidia-pytriton`` wheel (Triton 2.51 and its Python backend):

- Its Python-backend stub was built before numpy 2; under numpy 2 it hands the model corrupted
  tensors (a BYTES input arrives as its first byte repeated). So the stub runs in a *backend
  environment* (``make setup``: ``<venv>/triton-backend``), a venv holding ``nvidia-pytriton`` and
  numpy 1.26 (``requirements-triton.lock``) whose ``site-packages`` is followed, through a ``.pth``
  file, by the project environment's. Its ``bin`` goes first on ``PATH`` (the stub runs ``python3``).
- The stub links ``libpython3.X.so`` by name; a system libpython of another build breaks it
  (``'_thread.RLock' object has no attribute '_recursion_count'``), so ``LD_LIBRARY_PATH`` starts
  with this interpreter's own ``LIBDIR``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sd35trt.errors import BackendUnavailableError, Sd35TrtError

#: Overrides where the backend environment is (default: ``<sys.prefix>/triton-backend``).
BACKEND_ENV_VARIABLE = "SD35TRT_TRITON_ENV"


@dataclass(frozen=True)
class TritonPorts:
    """The server's TCP ports (HTTP, gRPC, metrics)."""

    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> TritonPorts:
        """Three ports the OS reports free now (another process may still take one: retried)."""
        socks = []
        try:
            for _ in range(3):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            return cls(*(s.getsockname()[1] for s in socks))
        finally:
            for s in socks:
                s.close()


@dataclass(frozen=True)
class BackendEnvironment:
    """The venv the Python-backend stub runs in, and the tritonserver inside it."""

    root: Path

    @classmethod
    def default(cls) -> BackendEnvironment:
        return cls(Path(os.environ.get(BACKEND_ENV_VARIABLE) or Path(sys.prefix) / "triton-backend"))

    @property
    def site_packages(self) -> Path:
        return Path(sysconfig.get_path("purelib", vars={"base": str(self.root), "platbase": str(self.root)}))

    @property
    def tritonserver_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    def link_project(self) -> Path:
        """Write (and return) a ``.pth`` file that adds this interpreter's ``site-packages`` (its
        ``.pth`` files included) after the backend environment's own, so numpy 1.x is found first."""
        project = sysconfig.get_path("purelib")
        pth = self.site_packages / "sd35trt-project.pth"
        pth.parent.mkdir(parents=True, exist_ok=True)
        pth.write_text(f"import site; site.addsitedir({project!r})\n")
        return pth

    def check(self) -> None:
        """Raises BackendUnavailableError naming what is missing and how to install it."""
        fix = (
            f"run `make setup` (it installs requirements-triton.lock into {self.root}), "
            f"or point {BACKEND_ENV_VARIABLE} at such an environment"
        )
        if not (self.root / "bin" / "python3").exists():
            raise BackendUnavailableError(f"no Triton backend environment at {self.root}: {fix}")
        if not (self.tritonserver_dir / "bin" / "tritonserver").is_file():
            raise BackendUnavailableError(f"{self.root} has no nvidia-pytriton (tritonserver): {fix}")


class LocalTritonServer:
    """tritonserver serving ``repository`` (127.0.0.1 and free ports unless told otherwise).

    Use as a context manager, or :meth:`start` then :meth:`stop`::

        with LocalTritonServer(repo) as server:
            tritonclient.http.InferenceServerClient(server.http_url)
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        env: BackendEnvironment | None = None,
        log_path: str | Path | None = None,
        exit_timeout_s: int = 30,
        host: str = "127.0.0.1",
        ports: TritonPorts | None = None,
    ) -> None:
        """
        Args:
            log_path: where the server's log goes (default: a temporary file, kept after stop).
            exit_timeout_s: on stop, how long Triton waits for running requests (seconds).
            host: the address HTTP, gRPC and metrics listen on (``0.0.0.0``: every interface).
            ports: fixed ports (default: free ones, probed at start and retried if taken).
        """
        self.repository = Path(repository).absolute()
        self.env = env or BackendEnvironment.default()
        self.exit_timeout_s = exit_timeout_s
        self._workdir: Path | None = None
        self._log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None
        self.host = host
        self._fixed_ports = ports
        self.ports: TritonPorts | None = None

    # -- addresses -------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """``HOST:PORT`` (tritonclient's form: no scheme; 127.0.0.1 when listening everywhere)."""
        return f"{self._client_host}:{self._ports().http}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self._ports().grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self._ports().metrics}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("the server was not started")
        return self._log_path

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, RuntimeError):
            return ""

    def _ports(self) -> TritonPorts:
        if self.ports is None:
            raise RuntimeError("the server was not started")
        return self.ports

    # -- lifecycle -------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The server's environment: the stub's python3 and libpython, the bundled libraries."""
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        libs = str(self.env.site_packages / "nvidia_pytriton.libs")  # the wheel's bundled libraries
        paths = [p for p in (libdir, libs, env.get("LD_LIBRARY_PATH")) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        env["PATH"] = os.pathsep.join([str(self.env.root / "bin"), env.get("PATH", "")])
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def _backends(self, workdir: Path) -> Path:
        """A backend directory whose Python backend has the stub for this Python version."""
        src = self.env.tritonserver_dir
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise BackendUnavailableError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        python = workdir / "backends" / "python"
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (python / name).symlink_to(src / "backends" / "python" / name)
        shutil.copy2(stub, python / stub.name)
        return workdir / "backends"

    def _command(self, backends: Path, ports: TritonPorts) -> list[str]:
        return [
            str(self.env.tritonserver_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports.metrics}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]

    def start(self, timeout_s: float = 300.0, attempts: int = 3) -> LocalTritonServer:
        """Start the server and wait until ``/v2/health/ready`` answers 200 (models loaded and warm).

        Raises:
            BackendUnavailableError: no backend environment.
            Sd35TrtError: the server exited before it was ready (its last log lines included), or
                was not ready within ``timeout_s`` (it is stopped).
        """
        self.env.check()
        self._workdir = Path(tempfile.mkdtemp(prefix="sd35trt-triton-"))
        if self._log_path is None:  # kept after stop, for a failure's post-mortem
            fd, name = tempfile.mkstemp(prefix="sd35trt-tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        backends = self._backends(self._workdir)
        for attempt in range(attempts):
            self.ports = self._fixed_ports or TritonPorts.free()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self._command(backends, self.ports),
                    env=self.environment(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches the parent only; it stops the server once
                )
            try:
                code = self._wait_ready(timeout_s)
            except BaseException:
                self.stop()
                raise
            if code is None:
                return self
            busy = "already in use" in self.log_tail(80).lower()  # "Socket 'host:port' already in use"
            if busy and attempt + 1 < attempts and self._fixed_ports is None:
                continue  # another process took a port between probing and binding
            self._cleanup()
            if busy:  # one of the fixed ports: name them rather than print Triton's log
                raise Sd35TrtError(
                    f"tritonserver could not listen: a port is already in use (HTTP {self.ports.http}, "
                    f"gRPC {self.ports.grpc}, metrics {self.ports.metrics}); choose free ones with "
                    f"--http-port/--grpc-port/--metrics-port (log: {self.log_path})"
                )
            raise Sd35TrtError(
                f"tritonserver exited with {code} before it was ready; "
                f"its log ({self.log_path}) ends:\n{self.log_tail(25)}"
            )
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout_s: float) -> int | None:
        """``None`` once ready, or the server's exit status if it exits first."""
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=2) as r,
            ):
                if r.status == 200:
                    return None
            time.sleep(0.2)
        raise Sd35TrtError(
            f"tritonserver was not ready within {timeout_s:g} s; its log ({self.log_path}) ends:\n"
            f"{self.log_tail(25)}"
        )

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait (Triton waits up to ``exit_timeout_s`` for running requests), then SIGKILL;
        returns the server's exit status (``None`` if it was not running)."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout_s if timeout_s is not None else self.exit_timeout_s + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = proc.returncode
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LocalTritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Signalled(Exception):
    pass


def serve_foreground(server: LocalTritonServer, echo, timeout_s: float = 600.0) -> int:
    """Start ``server``, say (through ``echo``) where it listens, and run until it exits or SIGINT /
    SIGTERM arrives. The server runs in its own session, so a terminal's Ctrl-C reaches only this
    process, which forwards it once as SIGTERM (a second would make Triton exit at once): Triton
    finishes running requests (up to its ``exit_timeout_s``) and exits.

    Returns:
        0 after a signal and a clean stop; else the server's own exit status.

    Raises:
        BackendUnavailableError: no backend environment.
        Sd35TrtError: the server exited before it was ready (its log's last lines included).
    """

    def stop(signum: int, frame: object) -> None:
        raise _Signalled(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start(timeout_s=timeout_s)
            echo(f"tritonserver ready (pid {server.process.pid}), serving {server.repository}")
            echo(f"  HTTP     http://{server.http_url}  (KServe v2; tritonclient.http: {server.http_url})")
            echo(f"  gRPC     {server.grpc_url}")
            echo(f"  metrics  {server.metrics_url}")
            echo(f"  log      {server.log_path}")
            echo("Ctrl-C stops it.")
            code = server.process.wait()
            server.stop()
            echo(f"tritonserver exited with {code}; its log ({server.log_path}) ends:\n{server.log_tail(25)}")
            return code
        except _Signalled:
            # ignore further signals while the server finishes its running requests
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            echo("stopping tritonserver (running requests finish first) ...")
            code = server.stop()
            echo(f"tritonserver stopped (exit status {code})")
            return 0 if code in (0, None) else code
    finally:
        if server.process is not None:  # left by an error here, e.g. echo into a closed pipe (`| head`)
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """``python -m sd35trt.triton.local link ENV``: link ENV to this environment (``make setup``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "link":
        raise SystemExit("usage: python -m sd35trt.triton.local link BACKEND_ENV")
    print(f"wrote {BackendEnvironment(Path(args[1]).absolute()).link_project()}")


if __name__ == "__main__":
    main()
