"""Download the wheels a lent GPU machine lacks for ``scripts/gpu_evidence.py``, into ``.whl/``.

That machine (see ``scripts/gpu_device_packages.txt``) has PyTorch, transformers, onnx and ONNX
Runtime but no diffusers, ModelOpt or pydantic, and no network. This script starts from
sd35trt's own dependencies (pyproject.toml), follows each wheel's ``Requires-Dist`` (markers
evaluated for the machine's CPython 3.12 on x86-64 Linux), and downloads, with
``pip download --no-deps``, every distribution the machine does not have, at the version
``requirements.lock`` pins (the tested set). sd35trt itself runs from the source tree.

    make gpu-wheels                  # or: .venv/bin/python scripts/gpu_wheels.py
    python scripts/gpu_wheels.py --dest .whl --budget-mib 64

It fails, naming the package, when a requirement is pinned nowhere, when a carried wheel needs
a version of a machine package other than the one the machine has, or when the wheels and the
working tree together exceed what one device call carries (64 MiB).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = REPO / "scripts" / "gpu_device_packages.txt"
LOCK = REPO / "requirements.lock"
#: The lent machine's interpreter and platform (Python 3.12.3, x86-64, glibc manylinux).
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MARKER_ENV = {
    "python_version": PYTHON_VERSION,
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
#: What one device call carries: the working tree and the carried paths together (64 MiB).
CARRY_LIMIT_MIB = 64.0
#: Machine packages carried anyway, at the lock's version, because the machine's version is not
#: known and a carried wheel needs a recent one: pydantic-core needs typing-extensions >= 4.16
#: (pure Python and backward compatible, so shadowing the machine's copy is safe).
REFRESH = frozenset({"typing-extensions"})


def read_device_packages(path: Path = DEVICE_PACKAGES) -> dict[str, Version | None]:
    """The machine's distributions: canonical name -> version (None where it is not known)."""
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``requirements.lock`` pins: canonical name -> version (local tags such as ``+cpu`` dropped)."""
    pins = {}
    for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", path.read_text(), flags=re.M):
        pins[canonicalize_name(m.group(1))] = m.group(2).split("+", 1)[0]
    return pins


def applies(req: Requirement) -> bool:
    """Whether ``req`` is needed on the machine (no extra, markers true for CPython 3.12 Linux)."""
    return req.marker is None or Marker(str(req.marker)).evaluate(MARKER_ENV)


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` entries of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(z.read(meta).decode("utf-8"))
    return [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


def download(name: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel for the machine's platform; returns its path."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["-d", str(dest), f"{name}=={version}"]
    subprocess.run(cmd, check=True)
    new = set(dest.glob("*.whl")) - before
    if new:
        return new.pop()
    # Already there from an earlier run: the one wheel of that name and version.
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}-"
    found = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    if len(found) != 1:
        raise SystemExit(f"gpu-wheels: cannot find the wheel of {name}=={version} in {dest}")
    return found[0]


def root_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """sd35trt's own runtime dependencies (no extras: TensorRT and onnxruntime-gpu are not carried)."""
    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def resolve(dest: Path) -> tuple[list[Path], list[str]]:
    """Download the closure of what the machine lacks.

    Returns:
        The wheels (one per distribution) and notes about machine packages whose version could
        not be checked against a requirement.

    Raises:
        SystemExit: a requirement pinned nowhere, or one the machine's known version breaks.
    """
    device, pins = read_device_packages(), read_lock()
    queue = [(r, "sd35trt") for r in root_requirements()]
    wheels: dict[str, Path] = {}
    notes: list[str] = []
    problems: list[str] = []
    while queue:
        req, wanted_by = queue.pop(0)
        if not applies(req):
            continue
        name = canonicalize_name(req.name)
        if name in device and name not in REFRESH:
            have = device[name]
            if have is None:
                if req.specifier:
                    notes.append(f"{name}{req.specifier} (for {wanted_by}): version on the machine not known")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{wanted_by} needs {name}{req.specifier}, the machine has {have}")
            continue
        if name in wheels:
            continue
        if name not in pins:
            problems.append(f"{name} (needed by {wanted_by}) is not pinned in {LOCK.name}: run `make lock`")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{wanted_by} needs {name}{req.specifier}, {LOCK.name} pins {pins[name]}")
            continue
        wheel = download(name, pins[name], dest)
        wheels[name] = wheel
        queue += [(r, f"{name} {pins[name]}") for r in wheel_requirements(wheel)]
    if problems:
        raise SystemExit("gpu-wheels: " + "; ".join(problems))
    return sorted(wheels.values()), notes


def tree_bytes() -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked, not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".whl", help="wheel directory (default .whl/)")
    parser.add_argument("--budget-mib", type=float, default=CARRY_LIMIT_MIB, help="carry limit (MiB)")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    wheels, notes = resolve(args.dest)
    stale = sorted(set(args.dest.glob("*.whl")) - set(wheels))
    for w in stale:  # wheels of earlier pins would install two versions of one package
        w.unlink()
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    for note in notes:
        print(f"note: {note}")
    tree = tree_bytes()
    print(
        f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}; with the working tree "
        f"({tree / 2**20:.1f} MiB) {(total + tree) / 2**20:.1f} of {args.budget_mib:.0f} MiB per device call"
    )
    if total + tree > args.budget_mib * 2**20:
        print("gpu-wheels: over the carry limit; carry fewer packages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
