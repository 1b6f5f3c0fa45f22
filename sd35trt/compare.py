"""``sd35trt verify ENGINES --compare``: every engine against its ONNX source, on the same inputs.

Polygraphy's ``Comparator`` runs the engine through sd35trt's own runtime backend (wrapped as a
runner, :func:`engine_runner`, so the bytes and code the runtime would use are checked) and its
ONNX source through ``OnnxrtRunner`` on a session opened as export validation opens it, on inputs
drawn by :func:`~sd35trt.sampling.sample_inputs` at the profile's ``opt`` and ``min`` shapes. Each
output must satisfy ``max|engine - onnx| <= atol + rtol * max|onnx|``
(:func:`~sd35trt.components.validation_tolerance`, as export validation does). A component whose
ONNX side cannot run here (ONNX Runtime refuses the graph) is reported as skipped, with the reason.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sd35trt.components import (
    Component,
    ComponentSpec,
    TensorType,
    Tolerance,
    validation_tolerance,
)
from sd35trt.errors import VerificationError
from sd35trt.sampling import sample_inputs
from sd35trt.stages.export.validate import OutputCheck

if TYPE_CHECKING:
    from sd35trt.artifacts.engine_manifest import EngineManifest
    from sd35trt.backends.engine import Engine
    from sd35trt.backends.machine import MachineInfo

#: Profile shapes each engine is compared at (``max`` is left out: at full size ONNX Runtime's
#: unfused attention at the largest image needs tens of GB).
CASES = ("opt", "min")


@dataclass(frozen=True)
class OutputComparison:
    """One output of one case: the engine's error against its ONNX source."""

    component: Component
    case: str  # "opt" or "min"
    shapes: Mapping[str, tuple[int, ...]]
    check: OutputCheck

    def describe(self) -> str:
        """``vae_decoder image at opt latent [2, 16, 16, 16]: max |engine - onnx| 0.1 > allowed 0.001``."""
        name, shape = next(iter(self.shapes.items()))
        c = self.check
        verdict = "<=" if c.ok else ">"
        return (
            f"{self.component.value} {c.output} at {self.case} {name} {list(shape)}: "
            f"max |engine - onnx| {c.max_abs:.3g} {verdict} allowed {c.allowed:.3g} "
            f"(max |onnx| {c.max_ref:.3g})"
        )


@dataclass
class CompareReport:
    """What ``--compare`` found: per output and case the error, and the components skipped."""

    results: list[OutputComparison] = field(default_factory=list)
    skipped: dict[Component, str] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[OutputComparison]:
        return [r for r in self.results if not r.check.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        """One line per component, output and case, then the skipped components."""
        lines = [
            f"engine vs its ONNX source in ONNX Runtime ({', '.join(self.providers)}); "
            "per output: max |engine - onnx| <= atol + rtol * max |onnx|"
        ]
        for r in self.results:
            c = r.check
            name, shape = next(iter(r.shapes.items()))
            where = f"{r.case} {name} {list(shape)}"
            lines.append(
                f"  {r.component.value:<12} {c.output:<18} {where:<34} {c.max_abs:>9.3g} "
                f"{'<=' if c.ok else '> '} {c.allowed:<9.3g} {'ok' if c.ok else 'OVER TOLERANCE'}"
            )
        for component, reason in self.skipped.items():
            lines.append(f"  {component.value:<12} skipped: {reason}")
        return "\n".join(lines)


def engine_runner(engine: Engine, name: str):
    """A Polygraphy runner around one of sd35trt's engines: numpy in, float32 numpy out."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class EngineRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name)
            self.engine = engine

        def activate_impl(self) -> None:
            self.engine.activate()

        def get_input_metadata_impl(self) -> TensorMetadata:
            meta = TensorMetadata()
            for t in self.engine.spec.inputs:
                dtype = np.int64 if t.dtype is TensorType.INT64 else np.float32
                meta.add(t.name, dtype, [d if isinstance(d, int) else None for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = self.engine.infer(
                {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feed_dict.items()}
            )
            self.inference_time = time.perf_counter() - start
            return OrderedDict((n, t.detach().float().cpu().numpy()) for n, t in out.items())

        def deactivate_impl(self) -> None:
            self.engine.deactivate()

    return EngineRunner()


def check_sources(manifest: EngineManifest, components: Iterable[Component]) -> dict[Component, Path]:
    """The ONNX source of each engine, checked against the engine manifest's records (and its
    external-data files against the run manifest's export record) before any reader parses it.

    Returns:
        The source path per component.

    Raises:
        VerificationError: a source is missing (engines outside their run directory, e.g. an
            unpacked artefact, which ships no ONNX), modified, or reads unrecorded data files.
        ModelError: an unsafe external-data location.
    """
    from sd35trt.artifacts.files import verify_files
    from sd35trt.artifacts.manifest import FileRecord, RunManifest, Stage
    from sd35trt.stages.export.onnx_files import (
        check_external_data,
        external_ref,
        iter_tensors,
        uses_external_data,
    )

    run_dir = manifest.directory.parent
    records = {c: manifest.record(c).source_onnx for c in components}
    missing = [f"{run_dir / r.path}" for r in records.values() if not (run_dir / r.path).is_file()]
    if missing:
        raise VerificationError(
            f"--compare needs the ONNX the engines were built from; missing: {', '.join(missing)} "
            "(run it on the engines directory of the run, runs/<name>/engines: an artefact ships no ONNX)"
        )
    verify_files(run_dir, records.values(), what="ONNX sources of the engines")
    export = RunManifest(run_dir).get(Stage.EXPORT)
    listed = {f.path: f for f in export.files} if export is not None else {}
    data: dict[str, FileRecord] = {}
    for rec in records.values():
        src = run_dir / rec.path
        for tensor in iter_tensors(check_external_data(src)):
            if not uses_external_data(tensor):
                continue
            rel = (Path(rec.path).parent / external_ref(tensor).location).as_posix()
            if rel not in listed:
                raise VerificationError(
                    f"{src} reads {rel}, which the export record in {run_dir / 'manifest.json'} does not "
                    "list; re-run `sd35trt export` and `sd35trt build`"
                )
            data[rel] = listed[rel]
    verify_files(run_dir, data.values(), what="ONNX data files of the engines")
    return {c: run_dir / r.path for c, r in records.items()}


def _vocab_sizes(manifest: EngineManifest, components: Iterable[Component]) -> dict[Component, int]:
    """Token vocabulary of each text encoder, from the tokenizers that travel with the engines."""
    encoders = [c for c in components if c.is_text_encoder]
    if not encoders:
        return {}
    from sd35trt.runtime.tokenize import PromptTokenizer

    t5_length = (
        manifest.record(Component.T5).profile["input_ids"].opt[1] if Component.T5 in manifest.engines else 1
    )
    tokenizer = PromptTokenizer.load(manifest.directory, t5_length)
    return {c: len(tokenizer.tokenizers[c]) for c in encoders}


def _feeds(sp: ComponentSpec, manifest: EngineManifest, vocab: int | None) -> list[tuple[str, OrderedDict]]:
    """``(case, feed_dict)`` at each of :data:`CASES`, leaving out a case that repeats earlier shapes."""
    profile = manifest.record(sp.component).profile
    out: list[tuple[str, OrderedDict]] = []
    seen = []
    for index, case in enumerate(CASES):
        shapes = {t.name: getattr(profile[t.name], case) for t in sp.inputs}
        if shapes in seen:
            continue
        seen.append(shapes)
        out.append((case, OrderedDict(sample_inputs(sp, shapes, index, vocab))))
    return out


def _run_pair(
    engine: Engine,
    source: Path,
    providers: list[str],
    sp: ComponentSpec,
    tol: Tolerance,
    feeds: list[OrderedDict],
) -> list[list[OutputCheck]]:
    """Run ``engine`` and ``source`` on ``feeds`` with Polygraphy's Comparator; per feed, the checks."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from sd35trt.stages.export import validate

    checks: list[list[OutputCheck]] = []

    def judge(engine_out, onnx_out) -> OrderedDict:
        actual = {n: np.asarray(engine_out[n], dtype=np.float32) for n in sp.output_names if n in engine_out}
        expected = {n: np.asarray(onnx_out[n], dtype=np.float32) for n in sp.output_names}
        found = validate.compare(actual, expected, tol)
        checks.append(found)
        return OrderedDict((ch.output, ch.ok) for ch in found)

    runners = [
        engine_runner(engine, "engine"),
        OnnxrtRunner(lambda: validate.session(source, providers), name="onnx"),
    ]
    # Polygraphy's own progress and dtype-cast notices say nothing the report does not.
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=feeds)
        Comparator.compare_accuracy(results, compare_func=judge)
    return checks


def compare_engines(
    engines_dir: str | Path,
    components: Iterable[Component] | None = None,
    *,
    machine: MachineInfo | None = None,
    device: str | None = None,
) -> CompareReport:
    """Run every engine of a run's ``engines/`` directory (or ``components``) and its ONNX source on
    the same inputs and compare their outputs; ``machine`` and ``device`` as
    :func:`~sd35trt.backends.load.verify_engines` and :func:`~sd35trt.backends.load.open_engines`
    take them.

    Returns:
        The per-output errors against the spec tolerance, and the components skipped (with why).

    Raises:
        VerificationError, IncompatibleEngineError, ManifestError: an engine or ONNX source is
            missing, modified, or not loadable on this machine.
        ModelError: an ONNX source has unsafe external-data locations.
    """
    from sd35trt.backends.load import open_engines, verify_engines
    from sd35trt.stages.export import validate

    manifest = verify_engines(engines_dir, components, machine)
    selected = list(components) if components is not None else list(manifest.engines)
    providers = validate.providers()
    report = CompareReport(providers=providers)
    sources = check_sources(manifest, selected)
    vocab = _vocab_sizes(manifest, selected)
    engines = open_engines(manifest, selected, device)
    for c in selected:
        rec, sp = manifest.record(c), manifest.spec(c)
        tol = validation_tolerance(sp, rec.precision, rec.fp8)
        cases = _feeds(sp, manifest, vocab.get(c))
        try:
            checks = _run_pair(engines[c], sources[c], providers, sp, tol, [feeds for _, feeds in cases])
        except validate.NotValidated as err:  # ONNX Runtime cannot run the source here
            report.skipped[c] = str(err)
            continue
        for (case, feeds), found in zip(cases, checks, strict=True):
            shapes = {n: tuple(a.shape) for n, a in feeds.items()}
            report.results += [OutputComparison(c, case, shapes, check) for check in found]
    return report
