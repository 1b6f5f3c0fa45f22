"""``sd35trt info`` and ``sd35trt inspect``: what is installed, and what a run directory holds."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from sd35trt.artifacts.manifest import FORMAT_VERSION, MANIFEST_NAME, RunManifest, read_json, tool_versions
from sd35trt.errors import ManifestError

#: FP8 (E4M3) tensor cores arrived with Ada (sm_89) and Hopper (sm_90).
FP8_MIN_CAPABILITY = (8, 9)


def collect_info() -> dict:
    """Versions of the toolchain and the CUDA devices, as a JSON-able dict."""
    versions = tool_versions(include_missing=True)
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


def model_lines(model: dict | None, indent: str = "  ") -> list[str]:
    """The weights a record was made from: ``model: <repo> @ <commit>`` and one line per LoRA."""
    if not model:
        return []
    lines = []
    hub = model.get("hub")
    if hub:
        lines.append(f"{indent}model: {hub['repo_id']} @ {hub['commit'][:12]} (revision {hub['revision']})")
    elif model.get("directory"):
        lines.append(f"{indent}model: {model['directory']}")
    for lora in model.get("loras") or []:
        where = f" @ {lora['hub']['commit'][:12]}" if lora.get("hub") else ""
        sha, scale = lora["sha256"][:12], lora["scale"]
        lines.append(f"{indent}lora {lora['path']} sha256 {sha} x {scale:g} ({lora['file']}{where})")
    return lines


def format_manifest(path: Path) -> str:
    """Readable summary of ``path/manifest.json`` (a run directory or an engines directory).

    Raises:
        ManifestError: there is no readable manifest at ``path``, or it does not validate.
    """
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{path} has no {MANIFEST_NAME}: it is not a run or engines directory")
    data = read_json(mpath, "it is not an sd35trt manifest")
    if "records" not in data:  # an engines directory
        return "\n".join(format_engines(Path(path)))
    records = RunManifest(path).load()
    lines = [f"run {path} (manifest format {FORMAT_VERSION})"]
    if not records:
        lines.append("  no stage has run yet")
    for stage, rec in records.items():
        total = sum(f.size for f in rec.files)
        lines.append(f"{stage.value}: created {rec.created}, config {rec.config_digest[:12]}")
        for up, digest in rec.upstream.items():
            lines.append(f"  from {up.value} record {digest[:12]}")
        lines.append(f"  {len(rec.files)} files, {_size(total)}")
        for f in rec.files:
            lines.append(f"    {f.path:<48} {_size(f.size):>10}  {f.sha256[:12]}")
        versions = ", ".join(f"{k} {v}" for k, v in sorted(rec.versions.items()))
        lines.append(f"  versions: {versions}")
        # Every detail, one line each: the stage's own fields, whatever they are (the weights first).
        details = rec.details.to_json()
        lines += model_lines(details.get("model"))
        for key, value in details.items():
            if key == "model":
                continue
            text = json.dumps(value, sort_keys=True)
            lines.append(f"  {key}: {text if len(text) < 160 else text[:157] + '...'}")
    engines_dir = Path(path) / "engines"
    if (engines_dir / MANIFEST_NAME).is_file():
        lines += format_engines(engines_dir)
    return "\n".join(lines)


def format_engines(engines_dir: Path) -> list[str]:
    """Readable lines for an engines directory: per engine, what it was built as and runs.

    TensorRT engines show their layer information: layers per precision, FP8 GEMMs against the
    quantized Linear layers of their ONNX, the layers that fell back, fused attention layers,
    and the activation memory they need.

    Raises:
        ManifestError: the engine manifest is missing or malformed.
    """
    from sd35trt.artifacts.engine_manifest import read_engine_manifest
    from sd35trt.backends.load import built_for

    manifest = read_engine_manifest(engines_dir)
    lines = [f"engines {engines_dir} ({manifest.backend.value}, created {manifest.created})"]
    for component, rec in manifest.engines.items():
        size = sum(f.size for f in rec.files)
        fp8 = " + fp8" if rec.fp8 else ""
        lines.append(
            f"  {component.value:<12} {rec.file.path:<22} {_size(size):>10}  {rec.precision.value}{fp8}, "
            f"built for {built_for(rec)} in {rec.build_seconds:.1f} s"
        )
        if rec.device_memory_bytes is not None:
            lines.append(f"    activation memory {_size(rec.device_memory_bytes)}")
        if rec.layers is None:
            continue
        lines.append(f"    {rec.layers.summary()}")
        if rec.layers.fell_back_count:
            more = rec.layers.fell_back_count - len(rec.layers.fell_back)
            lines.append(
                f"    fell back from FP8: {', '.join(rec.layers.fell_back)}"
                + (f" and {more} more" if more > 0 else "")
            )
        if rec.layers.fused_attention:
            lines.append(
                f"    fused attention: {', '.join(rec.layers.fused_attention[:6])}"
                + (
                    f" and {len(rec.layers.fused_attention) - 6} more"
                    if len(rec.layers.fused_attention) > 6
                    else ""
                )
            )
    has_encoder = any(c.value == "vae_encoder" for c in manifest.engines)
    lines.append(
        "  image-to-image: "
        + ("yes (vae_encoder engine)" if has_encoder else "no (built without a vae_encoder engine)")
    )
    lines += model_lines(dict(manifest.model))
    return lines
