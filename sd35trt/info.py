"""``sd35trt info`` and ``sd35trt inspect``: what is installed, and what a run directory holds."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.artifacts.engine_manifest import LayerReport
from sd35trt.artifacts.manifest import FORMAT_VERSION, MANIFEST_NAME, RunManifest, Stage, tool_versions
from sd35trt.errors import ManifestError
from sd35trt.user_files import read_json

if TYPE_CHECKING:
    from sd35trt.artifacts.engine_manifest import EngineManifest

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


#: A detail whose JSON is shorter than this is one line; a longer one is split by keys and items.
DETAIL_LINE_CHARS = 160
#: Items of a long list shown; the rest are counted.
DETAIL_LIST_ITEMS = 12


def detail_lines(key: str, value: object, indent: str) -> list[str]:
    """``key: <JSON>`` lines for a record detail, never cut inside a JSON value: a long object gets
    one line per member, a long list one per item (the first :data:`DETAIL_LIST_ITEMS`), nested."""
    text = json.dumps(value, sort_keys=True)
    if len(text) < DETAIL_LINE_CHARS or not isinstance(value, dict | list) or not value:
        return [f"{indent}{key}: {text}"]
    if isinstance(value, dict):
        lines = [f"{indent}{key}: ({len(value)} keys)"]
        for k in sorted(value):
            lines += detail_lines(str(k), value[k], indent + "  ")
        return lines
    lines = [f"{indent}{key}: ({len(value)} items)"]
    for i, item in enumerate(value[:DETAIL_LIST_ITEMS]):
        lines += detail_lines(f"[{i}]", item, indent + "  ")
    if len(value) > DETAIL_LIST_ITEMS:
        lines.append(f"{indent}  ... and {len(value) - DETAIL_LIST_ITEMS} more items")
    return lines


def format_manifest(path: Path) -> str:
    """Readable summary of ``path/manifest.json`` (a run directory or an engines directory).

    Raises:
        ManifestError: there is no readable manifest at ``path``, or it does not validate.
    """
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file() and (Path(path) / Stage.BUILD.directory / MANIFEST_NAME).is_file():
        return "\n".join(format_engines(Path(path) / Stage.BUILD.directory))  # an unpacked artefact
    if not mpath.is_file():
        raise ManifestError(
            f"{path} has no {MANIFEST_NAME}: it is not a run or engines directory, nor an unpacked artefact"
        )
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
        details = rec.details.to_json()
        lines += model_lines(details.get("model"))
        for key, value in details.items():
            if key == "model":
                continue
            lines += detail_lines(key, value, "  ")
    engines_dir = Path(path) / "engines"
    if (engines_dir / MANIFEST_NAME).is_file():
        lines += format_engines(engines_dir)
    return "\n".join(lines)


def _listed(items: list[str], limit: int = 6) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def layer_lines(layers: LayerReport, indent: str = "    ") -> list[str]:
    """The FP8 proof of one engine, readable: layers per precision and per output type, the
    quantized MatMuls inside FP8 GEMM layers (those holding several: fused projections), the ones
    that fell back, fused attention layers by tactic."""
    lines = [layers.summary()]
    if layers.detailed:
        outputs = sorted(layers.output_precisions.items(), key=lambda kv: -kv[1])
        if outputs:
            lines.append("layer outputs: " + ", ".join(f"{k} {v}" for k, v in outputs))
        if layers.quantized_linear:
            inside = layers.quantized_linear - layers.fell_back_count
            verdict = (
                "every quantized MatMul is inside an FP8 GEMM"
                if layers.fp8_complete
                else f"{layers.fell_back_count} quantized MatMuls are in no FP8 GEMM"
            )
            lines.append(
                f"FP8 proof ({layers.source}): {verdict} ({inside}/{layers.quantized_linear} in "
                f"{layers.fp8_gemms} FP8 GEMM layers)"
            )
            fused = [
                f"{name} ({len(nodes)})" for name, nodes in layers.fp8_gemm_layers.items() if len(nodes) > 1
            ]
            if fused:
                lines.append(f"FP8 GEMMs holding several MatMuls: {_listed(fused, 3)}")
    if layers.fell_back_count:
        more = layers.fell_back_count - len(layers.fell_back)
        lines.append(
            f"fell back from FP8: {', '.join(layers.fell_back)}" + (f" and {more} more" if more > 0 else "")
        )
    if layers.fused_attention:
        tactics = ", ".join(f"{t} x{n}" for t, n in layers.fused_attention_tactics.items())
        lines.append(
            f"fused attention: {_listed(layers.fused_attention)}"
            + (f" (tactics: {tactics})" if tactics else "")
        )
    return [indent + line for line in lines]


def format_engines(engines_dir: Path) -> list[str]:
    """Readable lines for an engines directory: per engine, what it was built as and runs (and for
    TensorRT engines their layers and the activation and weights memory they need).

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
        memory = [
            f"{what} {_size(n)}"
            for what, n in (
                ("activation memory", rec.device_memory_bytes),
                ("weights", rec.layers.weights_bytes if rec.layers else None),
            )
            if n is not None
        ]
        if memory:
            lines.append(f"    {', '.join(memory)}")
        if rec.layers is not None:
            lines += layer_lines(rec.layers)
    has_encoder = any(c.value == "vae_encoder" for c in manifest.engines)
    lines.append(
        "  image-to-image: "
        + ("yes (vae_encoder engine)" if has_encoder else "no (built without a vae_encoder engine)")
    )
    lines.append("  " + controlnet_line(manifest))
    lines += model_lines(dict(manifest.model))
    return lines


def controlnet_line(manifest: EngineManifest) -> str:
    """``controlnet: canny (controlnet_canny engine, bf16); the transformer takes their 19 block
    residuals as controlnet_block_samples``, or that the engines have none."""
    from sd35trt.components import CONTROLNET_INPUT, Component

    nets = [
        f"{c.control_type.value} ({c.value} engine, {rec.precision.value}{' + fp8' if rec.fp8 else ''})"
        for c, rec in manifest.engines.items()
        if c.is_controlnet
    ]
    if not nets:
        return "controlnet: no (built without model.controlnet)"
    transformer = manifest.engines.get(Component.TRANSFORMER)
    residuals = transformer.controlnet_layers if transformer is not None else 0
    return (
        f"controlnet: {', '.join(nets)}; the transformer takes their {residuals} block residuals as "
        f"{CONTROLNET_INPUT}"
    )
