"""The one stage driver: calibrate, export and build all run through :func:`run_stage`.

A stage is a :class:`StageSpec` subclass: its :class:`~sd35trt.artifacts.records.Stage` (name,
output directory, config sections), upstream stages, typed details and its own steps. For every
stage alike the driver then (0) lets the stage ``check`` what the config alone shows (a ControlNet
path naming nothing, faults.md #46), (1) refuses a ``--run-dir`` that is not a run before writing anything,
holds the writer lock and removes the stage's own leftovers (faults.md #4, #22, #29); (2) lets the
stage ``prepare`` (resolve inputs, check the config); (3) verifies the upstream records, naming
what changed and the one command that brings the chain up to date (#16, issue 26.5); (4) returns
the existing record when it is fresh (fingerprint, upstream, files through the hash cache, the
stage's ``reusable``), after a stage's small in-place ``refresh`` (build's runtime defaults);
(5) otherwise hashes the upstream files fully, lets ``produce`` write a staging directory that
replaces the output only on success and only when the output holds nothing unrecorded (#29), and
(6) writes the record last (#23). A directory that cannot be written is one line (#32).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from sd35trt.artifacts.files import (
    HashCache,
    atomic_write_bytes,
    atomic_write_text,
    file_record,
    records_for_tree,
)
from sd35trt.artifacts.manifest import RunManifest, new_record, now_utc, staged_directory, unrecorded_marker
from sd35trt.artifacts.records import Fingerprint, ModelInput, Stage, StageRecord
from sd35trt.artifacts.runlock import stage_session, unwritable_is_one_line
from sd35trt.config import Config
from sd35trt.errors import ManifestError, RunDirError

if TYPE_CHECKING:
    from sd35trt.models.loading import ResolvedModel

Progress = Callable[[str], None]


def print_progress(line: str) -> None:
    """The default progress of the stages: one line on stderr."""
    print(line, file=sys.stderr, flush=True)


@dataclass
class StageRun:
    """One run of a stage, handed to the stage's steps (``run_dir`` checked and locked; ``inputs``:
    the verified upstream records, filled after ``prepare``)."""

    stage: Stage
    config: Config
    run_dir: Path
    manifest: RunManifest
    hint: str
    progress: Progress
    inputs: dict[Stage, StageRecord] = field(default_factory=dict)

    def command(self, stage: Stage, *flags: str) -> str:
        """```sd35trt <stage> <flags> <hint>```, quoted for a message."""
        return "`" + " ".join(("sd35trt", stage.value, *flags, self.hint)).strip() + "`"

    @property
    def chain(self) -> str:
        """The one command that brings every stage up to this one up to date."""
        return self.command(self.stage, "--upstream").strip("`")

    def relative(self, path: str | Path) -> Path:
        """``path`` relative to the run directory when inside it, else absolute (faults.md #31)."""
        full = Path(path).absolute()
        root = self.run_dir.absolute()
        return full.relative_to(root) if full.is_relative_to(root) else full

    def model_input(self, resolved: ResolvedModel) -> ModelInput:
        """The weights a stage was made from, for its record (directory as :meth:`relative`)."""
        data = resolved.provenance()
        return ModelInput.model_validate({**data, "directory": self.relative(data["directory"]).as_posix()})

    def fingerprint(self, stage: Stage, identity: Mapping[str, Any]) -> Fingerprint:
        """``stage``'s fingerprint under this config (the weights count for calibrate and export)."""
        return Fingerprint.of(self.config, stage, identity if stage is not Stage.BUILD else None)

    def verified_upstream(self, stage: Stage, identity: Mapping[str, Any], *, cached: bool) -> StageRecord:
        """The record of upstream ``stage``, verified (files hashed through the cache when ``cached``);
        raises as :meth:`RunManifest.verified`, suggesting :attr:`chain`."""
        cache = HashCache(self.run_dir) if cached else None
        fingerprint = self.fingerprint(stage, identity)
        return self.manifest.verified(stage, fingerprint, self.hint, cache=cache, chain=self.chain)


class StageSpec:
    """A stage, declared: subclassed once per stage, one instance per run (it keeps what
    :meth:`prepare` resolved for the other steps); ``details`` is what :meth:`produce` returns."""

    stage: ClassVar[Stage]
    details: ClassVar[type[BaseModel]]

    def upstream(self, config: Config) -> tuple[Stage, ...]:
        """The stages whose records this one reads (default: the one before it)."""
        return (self.stage.upstream,) if self.stage.upstream is not None else ()

    def check(self, config: Config) -> None:
        """Refuse, from the config alone, an input that names nothing: before the run directory,
        its lock file or a built-in model is written. Every stage reads the model, so by default:
        the ControlNets' ``path`` (:func:`sd35trt.models.controlnet.check_paths`).

        Raises:
            ModelError: naming the field, the value and what is allowed.
        """
        from sd35trt.models.controlnet import check_paths

        check_paths(config.model)

    def prepare(self, run: StageRun) -> Mapping[str, Any]:
        """Resolve inputs and check the config (nothing heavy, nothing written).

        Returns:
            The weights' identity (resolved Hub commit, LoRA hashes; ``{}`` for neither).
        """
        return {}

    def produce(self, run: StageRun, out: Path) -> BaseModel:
        """Write the output into the staging directory ``out``; return the record's details."""
        raise NotImplementedError

    def reusable(self, run: StageRun, record: StageRecord) -> bool:
        """Beyond fingerprint, upstream and files, whether the existing record still holds."""
        return True

    def refresh(self, run: StageRun, record: StageRecord) -> dict[str, bytes]:
        """For a reusable record: small output files to rewrite in place (name -> bytes)."""
        return {}


def run_stage(
    spec: StageSpec,
    config: Config,
    run_dir: str | Path,
    *,
    force: bool = False,
    hint: str = "",
    progress: Progress = print_progress,
) -> StageRecord:
    """Run ``spec``'s stage on ``run_dir``: lock, upstream checks, freshness, staging, publish, record.

    Args:
        run_dir: the run directory (created when new).
        force: redo the stage even when its output is up to date.
        hint: appended to suggested commands (e.g. ``--config configs/tiny.yaml``).
        progress: receives one line per step.

    Returns:
        The stage's record, now in ``run_dir/manifest.json`` (the existing one when up to date).

    Raises:
        RunDirError: ``run_dir`` is not a run directory, or cannot be written.
        RunDirBusyError: another process writes it.
        ManifestError, StaleArtifactError, VerificationError: an upstream record is missing,
            stale or damaged.
        Sd35TrtError: whatever the stage's own steps raise (see each stage).
    """
    stage, run_dir = spec.stage, Path(run_dir)
    spec.check(config)
    with stage_session(run_dir, stage):
        run = StageRun(stage, config, run_dir, RunManifest(run_dir), hint, progress)
        records = run.manifest.load()  # an unreadable manifest is the user's to fix, not a reason to redo
        missing = [up for up in spec.upstream(config) if up not in records]
        if missing:  # before prepare writes anything (the built-in model)
            raise run.manifest.no_record(missing[0], hint)
        identity = spec.prepare(run)
        for up in spec.upstream(config):
            run.inputs[up] = run.verified_upstream(up, identity, cached=True)
        fingerprint = run.fingerprint(stage, identity)
        if not force and (record := _reusable(spec, run, fingerprint)) is not None:
            progress(f"{stage.value}: {run_dir / stage.directory} is up to date (--force redoes it)")
            return _refreshed(spec, run, record)
        for up in run.inputs:  # what the stage reads is hashed fully, not taken from the cache
            run.inputs[up] = run.verified_upstream(up, identity, cached=False)
        _check_replaceable(run)
        with unwritable_is_one_line(stage.value, run_dir):
            with staged_directory(run_dir, stage.directory, unrecorded_marker(run_dir, stage)) as out:
                details = spec.produce(run, out)
                if not isinstance(details, spec.details):
                    raise TypeError(f"{stage.value} produced {type(details).__name__}, not {spec.details}")
            files = records_for_tree(run_dir, stage.directory)
            record = new_record(stage, fingerprint, files, upstream=run.inputs, details=details)
            run.manifest.put(stage, record)
        return record


def _reusable(spec: StageSpec, run: StageRun, fingerprint: Fingerprint) -> StageRecord | None:
    """The existing record when it is intact, made from these inputs and upstream, and reusable."""
    try:
        record = run.manifest.verified(spec.stage, fingerprint, cache=HashCache(run.run_dir))
    except ManifestError:  # missing, stale or damaged: redo
        return None
    if record.upstream != {s: r.digest() for s, r in run.inputs.items()}:
        return None
    return record if spec.reusable(run, record) else None


def _refreshed(spec: StageSpec, run: StageRun, record: StageRecord) -> StageRecord:
    """Rewrite the small files ``spec.refresh`` returns, under the unrecorded marker, and re-record."""
    changed = spec.refresh(run, record)
    if not changed:
        return record
    stage, run_dir = spec.stage, run.run_dir
    paths = {f"{stage.directory}/{name}": data for name, data in changed.items()}
    with unwritable_is_one_line(stage.value, run_dir):
        marker = unrecorded_marker(run_dir, stage)
        atomic_write_text(marker, f"{', '.join(paths)} rewritten at {now_utc()}, not recorded yet\n")
        for rel, data in paths.items():
            atomic_write_bytes(run_dir / rel, data)
        files = tuple(file_record(run_dir, f.path) if f.path in paths else f for f in record.files)
        updated = record.model_copy(update={"files": files, "created": now_utc()})
        run.manifest.put(stage, updated)
    return updated


def _check_replaceable(run: StageRun) -> None:
    """Refuse to replace an output directory holding files its record does not list.

    The stage's own unrecorded publish (its marker is there) is replaceable.

    Raises:
        RunDirError: naming the first few such files (nothing is removed).
    """
    out = run.run_dir / run.stage.directory
    if not out.exists() or unrecorded_marker(run.run_dir, run.stage).exists():
        return
    record = run.manifest.get(run.stage)
    recorded = {f.path for f in record.files} if record is not None else set()
    if out.is_symlink() or not out.is_dir():
        stray = [run.stage.directory]
    else:
        found = (p.relative_to(run.run_dir).as_posix() for p in sorted(out.rglob("*")) if not p.is_dir())
        stray = [p for p in found if p not in recorded]
    if stray:
        more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
        raise RunDirError(
            f"{out} holds files no {run.stage.value} record lists ({', '.join(stray[:3])}{more}); "
            f"`sd35trt {run.stage.value}` replaces that directory: move them out of the run directory, "
            "then re-run; nothing was removed"
        )
