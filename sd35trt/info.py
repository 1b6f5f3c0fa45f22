"""``sd35trt info`` and ``sd35trt inspect``: what is installed, and what a run directory holds."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from sd35trt.errors import ManifestError
from sd35trt.manifest import MANIFEST_NAME, read_json

#: Distributions reported by ``sd35trt info`` (import names differ; metadata needs no import).
PACKAGES = (
    "sd35trt",
    "torch",
    "diffusers",
    "transformers",
    "nvidia-modelopt",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "polygraphy",
    "tensorrt",
)

#: FP8 (E4M3) tensor cores arrived with Ada (sm_89) and Hopper (sm_90).
FP8_MIN_CAPABILITY = (8, 9)


def collect_info() -> dict:
    """Versions of the toolchain and the CUDA devices, as a JSON-able dict."""
    versions = {}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    devices = []
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cc = (p.major, p.minor)
            devices.append(
                {
                    "index": i,
                    "name": p.name,
                    "compute_capability": f"{cc[0]}.{cc[1]}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "fp8": cc >= FP8_MIN_CAPABILITY,
                }
            )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "devices": devices,
    }


def format_info(info: dict) -> str:
    lines = [f"python {info['python']} on {info['platform']}"]
    for name, v in info["versions"].items():
        lines.append(f"  {name:<16} {v or 'not installed'}")
    lines.append(f"CUDA runtime: {info['cuda'] or 'none (CPU build of torch)'}")
    if not info["devices"]:
        lines.append("CUDA devices: none (ONNX Runtime on CPU will be used)")
    for d in info["devices"]:
        fp8 = "FP8 supported" if d["fp8"] else "no FP8 (needs sm_89+)"
        lines.append(
            f"  cuda:{d['index']} {d['name']}, sm_{d['compute_capability'].replace('.', '')}, "
            f"{d['memory_gib']} GiB, {fp8}"
        )
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_manifest(path: Path) -> str:
    """Readable summary of ``path/manifest.json`` (a run directory or an engines directory).

    Raises:
        ManifestError: there is no readable manifest at ``path``.
    """
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{path} has no {MANIFEST_NAME}: it is not a run or engines directory")
    data = read_json(mpath, "it is not an sd35trt manifest")
    records = data.get("records")
    if not isinstance(records, dict):  # an engines directory: print its own structure
        return json.dumps(data, indent=2, sort_keys=True)
    lines = [f"run {path} (manifest format {data.get('format')})"]
    if not records:
        lines.append("  no stage has run yet")
    for stage, rec in records.items():
        files = rec.get("files", [])
        total = sum(f.get("size", 0) for f in files)
        lines.append(f"{stage}: created {rec.get('created')}, config {str(rec.get('config_digest'))[:12]}")
        for up, digest in rec.get("upstream", {}).items():
            lines.append(f"  from {up} record {digest[:12]}")
        lines.append(f"  {len(files)} files, {_size(total)}")
        for f in files:
            lines.append(f"    {f['path']:<48} {_size(f['size']):>10}  {f['sha256'][:12]}")
        versions = ", ".join(f"{k} {v}" for k, v in sorted(rec.get("versions", {}).items()))
        lines.append(f"  versions: {versions}")
        for key, value in rec.get("details", {}).items():
            text = json.dumps(value, sort_keys=True)
            lines.append(f"  {key}: {text if len(text) < 160 else text[:157] + '...'}")
    return "\n".join(lines)
