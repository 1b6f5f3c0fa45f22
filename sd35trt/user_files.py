"""Small files a user writes (a YAML config, a prompts file), read defensively; and JSON objects
(manifests, a model's component configs, a scheduler config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sd35trt.errors import ConfigError, ManifestError, Sd35TrtError

#: A config or prompts file larger than this is not one (the shipped configs are ~2 KB).
MAX_TEXT_FILE_BYTES = 1 << 20
#: Error messages quote at most this much of a parser's text (a hostile file can make it huge).
MAX_ERROR_CHARS = 300


def _capped(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a small user file; ``what`` names it in messages (``"config file"``).

    Raises:
        ConfigError: the file is missing, a directory, unreadable, over
            :data:`MAX_TEXT_FILE_BYTES`, binary (holds a NUL byte) or not UTF-8 (the byte offset is named).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TEXT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_TEXT_FILE_BYTES} bytes; it is not a text file")
    if (nul := data.find(b"\0")) >= 0:
        raise ConfigError(f"{what} {path} is binary (a NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte offset {err.start})") from None


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (a few hundred bytes can expand into gigabytes, a "billion
    laughs") and duplicate keys (the second silently overrides the first): both are refused with
    the line they are on."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{event.anchor} is not allowed in a config (write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error follows
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {first} and {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def output_directory(path: Path, option: str, *, empty: bool = False, outside: Path | None = None) -> None:
    """Refuse an output directory named by ``option`` (``--out``) before anything is written.

    Raises:
        ConfigError: ``path`` is a file; with ``empty``, a directory holding anything (its files
            would be replaced); with ``outside``, inside that directory (an engines directory,
            whose ``verify`` would then find files it does not list).
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; a directory is needed (a new or existing one)")
    if empty and path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{option} {path} is a directory holding files; give a new or empty directory")
    if outside is not None and path.resolve().is_relative_to(outside.resolve()):
        raise ConfigError(f"{option} {path} is inside {outside}; give a directory outside it")


def parse_yaml(text: str, source: str) -> Any:
    """Parse a config's YAML (no aliases, no duplicate keys); ConfigError names ``source`` and the
    problem (cut to :data:`MAX_ERROR_CHARS` characters)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as err:
        text = str(err).replace('in "<unicode string>", ', "")
        raise ConfigError(f"{source}: not valid YAML: {_capped(text)}") from None
    except ValueError as err:  # int() of a number longer than Python's 4300-digit limit
        raise ConfigError(f"{source}: a value cannot be read: {_capped(str(err).split(';')[0])}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML nests too deeply") from None


def read_json(
    path: Path, what: str = "", *, error: type[Sd35TrtError] = ManifestError, missing: str = "does not exist"
) -> dict:
    """The JSON object in ``path``; ``what`` says what to do when it is not one, ``missing`` what a
    missing file means, ``error`` is the file's error family (a model's configs: ``ModelError``).

    Raises:
        ``error``: the file is missing, not JSON or not an object (the path named).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} {missing}") from None
    return json_object(path, raw, what, error=error)


def json_object(path: Path, raw: bytes, what: str = "", *, error: type[Sd35TrtError] = ManifestError) -> dict:
    """``raw`` parsed as a JSON object, or ``error`` naming ``path`` and telling ``what`` to do."""
    fix = f"; {what}" if what else ""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}){fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object{fix}")
    return data
