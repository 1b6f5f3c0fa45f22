"""Models and LoRAs named by Hugging Face repo id, resolved through the local Hugging Face cache.

``huggingface_hub.snapshot_download`` looks in the cache diffusers and the ``hf`` CLI fill first
(no network), and downloads only when allowed (:func:`resolve`), with the user's token as
``huggingface_hub`` finds it (gated repos such as SD3.5 need one). Only safetensors weights, JSON
configs and tokenizer files of a diffusers SD3 pipeline's folders are ever requested: never pickle
weights, nor the single-file checkpoints of many GB the SD3.5 repos also hold. The resolved commit
is recorded in the manifests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sd35trt.errors import ModelError, first_line

#: Environment variable that allows downloads, like ``model.allow_download: true``.
ALLOW_DOWNLOAD_ENV = "SD35TRT_ALLOW_DOWNLOAD"
DEFAULT_REVISION = "main"

#: Folders of a diffusers StableDiffusion3Pipeline repo and the file types read from them.
PIPELINE_FOLDERS = (
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
    "scheduler",
)
#: safetensors weights, JSON configs and indexes, tokenizer vocabularies (merges.txt, spiece.model).
SAFE_FILE_TYPES = ("*.safetensors", "*.json", "*.txt", "*.model")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Snapshot:
    """A repo's files at one commit, as a folder of the Hugging Face cache.

    Attributes:
        path: ``<cache>/models--<namespace>--<name>/snapshots/<commit>``.
        repo_id: ``namespace/name``.
        revision: the revision asked for (branch, tag or commit).
        commit: the commit hash it resolved to (40 hex digits).
    """

    path: Path
    repo_id: str
    revision: str
    commit: str

    def to_json(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def pipeline_patterns() -> list[str]:
    """``allow_patterns`` for a diffusers SD3 pipeline: ``model_index.json`` and its component folders."""
    return ["model_index.json", *(f"{d}/{t}" for d in PIPELINE_FOLDERS for t in SAFE_FILE_TYPES)]


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if value := os.environ.get("HF_HUB_CACHE"):
        return Path(value).expanduser()
    if value := os.environ.get("HF_HOME"):
        return Path(value).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether the Hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(_true(f) for f in flags)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def download_allowed(setting: bool) -> bool:
    """Whether a repo missing from the cache may be downloaded: ``model.allow_download`` (``setting``)
    or ``SD35TRT_ALLOW_DOWNLOAD=1``."""
    return setting or _true(os.environ.get(ALLOW_DOWNLOAD_ENV))


def download_hint(repo_id: str, patterns: list[str], revision: str) -> str:
    """The ``hf download`` command that puts the files ``patterns`` select into the cache."""
    globs = dict.fromkeys(p.split("/")[0] + "/*" if "/" in p else p for p in patterns)
    rev = f" --revision {revision}" if revision != DEFAULT_REVISION else ""
    return f"`hf download {repo_id}{rev} --include " + " ".join(f"'{g}'" for g in globs) + "`"


def resolve(
    repo_id: str,
    *,
    revision: str | None,
    patterns: list[str],
    allow_download: bool,
    what: str,
) -> Snapshot:
    """Find ``repo_id`` at ``revision`` in the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``).

    The cache is read first (``local_files_only``: works under ``HF_HUB_OFFLINE=1``); missing files
    are downloaded only when allowed and the Hub is not switched off (``HF_HUB_OFFLINE``).

    Args:
        repo_id: ``namespace/name``.
        revision: branch, tag or commit hash (default ``main``).
        patterns: the files needed (``allow_patterns``); nothing else is looked at or downloaded.
        allow_download: the config's flag (``SD35TRT_ALLOW_DOWNLOAD=1`` also allows it).
        what: the config key that named the repo, for messages (``model.path``).

    Raises:
        ModelError: one line: the repo is not cached (with the command that downloads it), the
            cached snapshot is incomplete, the repo or revision does not exist, access is denied
            (gated: accept the license and log in), or the download failed.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    revision = revision or DEFAULT_REVISION
    cache = cache_dir()
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns, local_files_only=True
        )
        return _snapshot(path, repo_id, revision)
    except HFValidationError as err:
        raise ModelError(f"{what} {repo_id!r} is not a valid Hugging Face repo id: {err}") from None
    except IncompleteSnapshotError:  # some requested files were never downloaded
        incomplete = True
    except LocalEntryNotFoundError:
        incomplete = False
    hint = download_hint(repo_id, patterns, revision)
    where = f"{repo_id} (revision {revision})"
    state = (
        f"the cached snapshot of {where} is incomplete"
        if incomplete
        else f"{where} is not in the Hugging Face cache"
    )
    if not download_allowed(allow_download):
        raise ModelError(
            f"{what}: {state} ({cache}); download it with {hint} (gated models: accept the license on "
            f"the Hub and `hf auth login` first), or let sd35trt download it: model.allow_download: true "
            f"or {ALLOW_DOWNLOAD_ENV}=1"
        )
    if hub_offline():
        raise ModelError(
            f"{what}: {state} ({cache}) and HF_HUB_OFFLINE is set, so nothing can be downloaded: "
            f"unset it or run {hint} where the Hub is reachable"
        )
    return _download(repo_id, revision, patterns, what)


def _download(repo_id: str, revision: str, patterns: list[str], what: str) -> Snapshot:
    """Download what :func:`resolve` did not find in the cache.

    Raises:
        ModelError: one line: gated, no such revision or repo, or the download failed.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), allow_patterns=patterns)
    except GatedRepoError:
        raise ModelError(
            f"{what}: {repo_id} is gated: accept its license on the Hugging Face Hub, then log in with "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{what}: {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{what}: no repo {repo_id} on the Hugging Face Hub (if it is private: `hf auth login`)"
        ) from None
    except (OSError, ValueError) as err:  # connection errors, HTTP errors, incomplete downloads
        raise ModelError(f"{what}: downloading {repo_id} failed: {first_line(err)}") from None
    return _snapshot(path, repo_id, revision)


def _snapshot(path: str, repo_id: str, revision: str) -> Snapshot:
    folder = Path(path)
    commit = folder.name
    if not _COMMIT.match(commit):  # never for the cache layout; a local_dir download would do it
        raise ModelError(f"{repo_id}: {folder} is not a snapshot folder of the Hugging Face cache")
    return Snapshot(path=folder, repo_id=repo_id, revision=revision, commit=commit)
