"""LoRAs fused into the model's weights before calibration and export.

``model.loras: [{path, scale}]`` names LoRA files (safetensors only) in diffusers' SD3 format:
keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.`` /
``text_encoder_2.`` for the CLIP encoders), as ``StableDiffusion3Pipeline.save_lora_weights`` and
diffusers' SD3 training scripts write them. Every loader of PyTorch weights (the pipeline for
calibrate and reference, one component for export and the PyTorch backend) calls
:func:`fuse_loras` right after loading, so the FP8 scales are calibrated on, and the graphs
exported from, the weights that are actually used. diffusers itself would skip keys of another
architecture with a log line, or fail deep in PEFT on a shape: :func:`check_lora` names them first.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd35trt.config import LoraSettings
from sd35trt.errors import ModelError, first_line
from sd35trt.models import hub
from sd35trt.models.weights import PICKLE_SUFFIXES, check_safetensors, read_header

if TYPE_CHECKING:
    from torch import nn

#: diffusers' pipeline attribute of each LoRA-loadable SD3 module (``SD3LoraLoaderMixin``).
LORA_MODULES = ("transformer", "text_encoder", "text_encoder_2")
#: The file name diffusers writes (``save_lora_weights``) and looks for first.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

#: ``<module path>.<part>`` of a LoRA key: PEFT's names and the older ``lora.down`` / ``lora.up``.
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up)(?:\.[^.]+)?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
#: Tensor dtypes a LoRA's weights can have: floating point. An integer or boolean file would be
#: fused as its raw numbers (there is no scale to dequantize it with).
LORA_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA file found, hashed and ready to fuse.

    Attributes:
        index: its position in ``model.loras`` (the adapter is named after it).
        file: the ``.safetensors`` file.
        sha256: the file's sha256 (part of the calibrate and export digests).
        scale: diffusers' ``lora_scale``.
        setting: the path as configured.
        hub: for a repo id, ``{repo_id, revision, commit}``.
    """

    index: int
    file: Path
    sha256: str
    scale: float
    setting: str
    hub: Mapping | None = None

    @property
    def adapter_name(self) -> str:
        return f"sd35trt_lora_{self.index}"

    @property
    def label(self) -> str:
        return f"model.loras[{self.index}] {self.file}"

    def identity(self) -> dict:
        """What the fused weights depend on: the bytes and the scale."""
        return {"sha256": self.sha256, "scale": self.scale}

    def to_json(self) -> dict:
        """For manifests and PNG parameters."""
        data = {"path": self.setting, "file": self.file.name, "sha256": self.sha256, "scale": self.scale}
        if self.hub is not None:
            data["hub"] = dict(self.hub)
        return data


def resolve_loras(settings: Sequence[LoraSettings], allow_download: bool = False) -> tuple[ResolvedLora, ...]:
    """Find, check and hash each LoRA file of ``model.loras``: one :class:`ResolvedLora` each, in order.

    ``allow_download`` is ``model.allow_download`` (Hub repo ids not in the cache).

    Raises:
        ModelError: a path that is neither a file, a directory holding one ``.safetensors`` file nor
            a cached (or downloadable) repo id; a pickle file; a damaged safetensors file.
    """
    from sd35trt.artifacts.files import sha256_file

    out = []
    for i, s in enumerate(settings):
        what = f"model.loras[{i}].path"
        file, repo = _locate(s, what, allow_download)
        check_safetensors(file)
        out.append(ResolvedLora(i, file, sha256_file(file), s.scale, s.path, repo))
    return tuple(out)


def _locate(s: LoraSettings, what: str, allow_download: bool) -> tuple[Path, dict | None]:
    from sd35trt.config import REPO_ID_PATTERN

    path = Path(s.path).expanduser()
    if path.is_file():
        if s.weight_name is not None:
            raise ModelError(
                f"{what} {s.path} is a file; weight_name only applies to directories and repo ids"
            )
        return _safetensors_only(path, what), None
    if path.is_dir():
        return _pick(path, s.weight_name, what), None
    if s.path.startswith((".", "/", "~")) or not re.fullmatch(REPO_ID_PATTERN, s.path):
        raise ModelError(f"{what} {s.path}: no such file or directory (nor a Hugging Face repo id)")
    patterns = [s.weight_name] if s.weight_name else ["*.safetensors"]
    snap = hub.resolve(
        s.path, revision=s.revision, patterns=patterns, allow_download=allow_download, what=what
    )
    return _pick(snap.path, s.weight_name, f"{what} {s.path}"), snap.to_json()


def _safetensors_only(path: Path, what: str) -> Path:
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelError(f"{what} {path} is a pickle file; sd35trt loads LoRAs as safetensors only")
    if path.suffix != ".safetensors":
        raise ModelError(f"{what} {path} is not a .safetensors file")
    return path


def _pick(folder: Path, weight_name: str | None, what: str) -> Path:
    if weight_name is not None:
        file = folder / weight_name
        if not file.is_file():
            raise ModelError(f"{what}: {folder} has no {weight_name}")
        return file
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    default = folder / DEFAULT_WEIGHT_NAME
    if default in found or len(found) == 1:
        return default if default in found else found[0]
    names = ", ".join(p.name for p in found) or "none"
    raise ModelError(
        f"{what}: {folder} holds {len(found)} .safetensors files ({names}); name one with weight_name"
    )


def _strip_text_model(module: str, names: Mapping[str, object]) -> str:
    # Older CLIP LoRAs name ``text_model.encoder...``; transformers 5 flattens CLIP (diffusers strips it).
    if module not in names and module.startswith("text_model."):
        return module.removeprefix("text_model.")
    return module


def check_lora(lora: ResolvedLora, modules: Mapping[str, nn.Module]) -> None:
    """Check ``lora``'s keys and shapes against the loaded ``modules`` it will be fused into.

    Args:
        modules: pipeline attribute -> loaded module, for the loadable modules present (export
            loads one at a time; keys of absent ones are checked when those load).

    Raises:
        ModelError: naming the file and the first key that belongs to no SD3 module, names a
            module the model lacks, has the wrong shape for it, is not floating point, whose
            ``lora_A`` and ``lora_B`` ranks differ, or an ``.alpha`` that is not one number of a
            module with LoRA weights; or a file with no LoRA key at all.
    """
    entries = read_header(lora.file)[1]
    if not entries:
        raise ModelError(f"{lora.label} holds no tensors")
    for key in sorted(entries):
        if entries[key].dtype not in LORA_DTYPES:
            raise ModelError(
                f"{lora.label}: key {key!r} has dtype {entries[key].dtype}; a LoRA's weights must be "
                f"floating point ({', '.join(LORA_DTYPES)})"
            )
    shapes = {k: list(e.shape) for k, e in entries.items()}
    _check_alphas(lora, shapes)
    names = {k: dict(m.named_modules()) for k, m in modules.items()}
    ranks: dict[tuple[str, str], dict[str, int]] = {}
    for key in sorted(shapes):
        prefix, _, rest = key.partition(".")
        if prefix not in LORA_MODULES:
            raise ModelError(
                f"{lora.label} is not an SD3 LoRA (diffusers format): key {key!r} belongs to none of "
                f"{', '.join(LORA_MODULES)} (a LoRA for another architecture?)"
            )
        if prefix not in names or _ALPHA.match(rest):
            continue
        m = _KEY.match(rest)
        if m is None:
            raise ModelError(f"{lora.label}: key {key!r} is not a LoRA weight (lora_A / lora_B)")
        module_name = _strip_text_model(m["module"], names[prefix])
        target = names[prefix].get(module_name)
        weight = getattr(target, "weight", None)
        if target is None or weight is None:
            raise ModelError(
                f"{lora.label}: key {key!r} names {prefix}.{module_name}, which this model does not have "
                "(a LoRA for another model?)"
            )
        shape = shapes[key]
        down = m["part"] in ("lora_A", "lora.down")
        if len(shape) < 2 or len(shape) != weight.dim():
            raise ModelError(
                f"{lora.label}: key {key!r} has shape {shape}, {prefix}.{module_name} has weight "
                f"{list(weight.shape)}"
            )
        expected, axis = (weight.shape[1], 1) if down else (weight.shape[0], 0)
        if shape[axis] != expected:
            side = "inputs" if down else "outputs"
            raise ModelError(
                f"{lora.label}: key {key!r} has shape {shape}, but {prefix}.{module_name} has {expected} "
                f"{side} (a LoRA for another model size?)"
            )
        rank = shape[0] if down else shape[1]
        ranks.setdefault((prefix, module_name), {})[key] = rank
        if len(set(ranks[(prefix, module_name)].values())) > 1:
            first = ", ".join(f"{k} rank {r}" for k, r in ranks[(prefix, module_name)].items())
            raise ModelError(f"{lora.label}: rank mismatch at key {key!r}: {first}")


def _check_alphas(lora: ResolvedLora, shapes: Mapping[str, list[int]]) -> None:
    """Each ``<module>.alpha`` is one number and belongs to a module with a ``lora_A`` (or ``lora.down``)."""
    for key in sorted(shapes):
        m = _ALPHA.match(key)
        if m is None:
            continue
        if shapes[key] not in ([], [1]):
            raise ModelError(f"{lora.label}: key {key!r} has shape {shapes[key]}; an alpha is one number")
        if _down_key(m["module"], shapes) is None:
            raise ModelError(
                f"{lora.label}: key {key!r} belongs to no module with LoRA weights "
                f"({m['module']}.lora_A.weight is missing)"
            )


def _down_key(module: str, keys: Mapping[str, object]) -> str | None:
    return next((k for k in (f"{module}.lora_A.weight", f"{module}.lora.down.weight") if k in keys), None)


def apply_alphas(state_dict: dict, label: str) -> dict:
    """Fold each ``<module>.alpha`` into that module's up weight and drop the alpha keys.

    A LoRA's update is ``alpha / rank * B @ A`` when the file holds ``alpha`` (kohya's and PEFT's
    ``lora_alpha``; ``rank`` = the rows of ``A``); diffusers' SD3 loader reads no such key (its
    ``load_lora_weights`` refuses the file, ``load_lora_into_transformer`` ignores it, which fused
    the update at ``alpha = rank``: twice the intended strength for ``alpha = rank / 2``). Scaling
    ``B`` by ``alpha / rank`` gives the update the file means at diffusers' scale 1.

    Args:
        state_dict: diffusers' ``lora_state_dict`` of the file; modified in place and returned.
        label: the LoRA, for errors.

    Raises:
        ModelError: an alpha that is not finite, or whose module has no up weight.
    """
    import math

    for key in sorted(k for k in state_dict if _ALPHA.match(k)):
        module = _ALPHA.match(key)["module"]
        alpha = float(state_dict.pop(key).reshape(-1)[0])
        down = _down_key(module, state_dict)
        up = next(
            (k for k in (f"{module}.lora_B.weight", f"{module}.lora.up.weight") if k in state_dict), None
        )
        if down is None or up is None or not math.isfinite(alpha):
            raise ModelError(f"{label}: key {key!r} ({alpha}) does not scale a lora_A / lora_B pair")
        rank = state_dict[down].shape[0]
        state_dict[up] = state_dict[up] * (alpha / rank)
    return state_dict


def fuse_loras(modules: Mapping[str, nn.Module], loras: Sequence[ResolvedLora]) -> None:
    """Fuse ``loras`` into ``modules`` in place, with diffusers' SD3 LoRA loader.

    Each LoRA in turn is checked (:func:`check_lora`), its ``.alpha`` keys folded in
    (:func:`apply_alphas`), loaded into the modules its keys name, fused at its scale and
    unloaded, so the modules end as plain layers with merged weights.

    Args:
        modules: pipeline attribute (``transformer``, ``text_encoder``, ``text_encoder_2``) ->
            the loaded module; other attributes (T5, the VAE) are ignored: SD3 LoRAs have none.
        loras: from :func:`resolve_loras`.

    Raises:
        ModelError: a file does not fit the modules (see :func:`check_lora`), peft is missing,
            or diffusers refuses the file (its message).
    """
    targets = {k: m for k, m in modules.items() if k in LORA_MODULES and m is not None}
    if not loras or not targets:
        return
    if importlib.util.find_spec("peft") is None:
        raise ModelError("model.loras needs the peft package (diffusers' LoRA backend): pip install peft")
    from diffusers import StableDiffusion3Pipeline

    for lora in loras:
        check_lora(lora, targets)
        try:
            state_dict, metadata = StableDiffusion3Pipeline.lora_state_dict(
                str(lora.file.parent),
                weight_name=lora.file.name,
                use_safetensors=True,
                local_files_only=True,
                return_lora_metadata=True,
            )
        except (OSError, ValueError) as err:
            raise ModelError(f"{lora.label}: diffusers cannot read it: {first_line(err)}") from None
        if any(_ALPHA.match(k) for k in state_dict) and metadata:
            raise ModelError(
                f"{lora.label} holds both .alpha keys and diffusers' adapter metadata (lora_alpha); "
                "keep one of them"
            )
        state_dict = apply_alphas(state_dict, lora.label)
        used = [k for k in targets if any(key.startswith(f"{k}.") for key in state_dict)]
        if not used:
            continue
        holder = _holder({k: targets[k] for k in used})
        try:
            for name in used:
                if name == "transformer":
                    holder.load_lora_into_transformer(
                        state_dict,
                        transformer=targets[name],
                        adapter_name=lora.adapter_name,
                        metadata=metadata,
                    )
                else:
                    holder.load_lora_into_text_encoder(
                        state_dict,
                        network_alphas=None,
                        text_encoder=targets[name],
                        prefix=name,
                        adapter_name=lora.adapter_name,
                        metadata=metadata,
                    )
            holder.fuse_lora(components=used, lora_scale=lora.scale, adapter_names=[lora.adapter_name])
        except (ValueError, RuntimeError, KeyError) as err:  # diffusers' and PEFT's load errors
            raise ModelError(f"{lora.label}: diffusers could not fuse it: {first_line(err)}") from None
        finally:
            holder.unload_lora_weights()


def _holder(modules: Mapping[str, nn.Module]):
    """A ``StableDiffusion3Pipeline`` holding only ``modules`` (diffusers fuses and unloads through it)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**{**dict.fromkeys(hub.PIPELINE_FOLDERS), **modules})
