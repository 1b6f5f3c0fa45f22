"""Typed JSON reports (``bench.json``, ``eval.json``): their base model, reading and writing.

A report is a pydantic model, so the command that writes it and every reader (the figures, the
scripts that redraw or merge them) share one schema instead of guessing keys. A file that does
not validate is one :class:`~sd35trt.errors.ReportError` line naming the file, the field, what
was found and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sd35trt.artifacts.files import atomic_write_json
from sd35trt.errors import ReportError, validation_message


class ReportModel(BaseModel):
    """Base of report records: unknown keys and non-finite numbers are refused; immutable once built."""

    # NaN and infinity are not JSON: a report holding them would be unreadable to other tools.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    def to_json(self) -> dict:
        """The record as JSON-ready data, with the file's key names (``schema``)."""
        return self.model_dump(mode="json", by_alias=True)


R = TypeVar("R", bound=ReportModel)


def read_report(path: str | Path, model: type[R]) -> R:
    """Read and validate a report file.

    Args:
        path: the JSON file.
        model: its report model (e.g. :class:`sd35trt.bench.report.BenchReport`).

    Returns:
        The validated report.

    Raises:
        ReportError: the file is missing, is not JSON, or a field does not match the schema
            (the message names the file and the field).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not a readable JSON file ({err})") from None
    return validate_report(data, model, str(path))


def validate_report(data: object, model: type[R], source: str) -> R:
    """``data`` (parsed JSON) as a ``model``; :class:`ReportError` naming ``source`` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ReportError(validation_message(err, source)) from None


def write_report(path: str | Path, report: ReportModel) -> Path:
    """Write ``report`` as JSON atomically (no half-written file at ``path``); returns the path."""
    path = Path(path)
    atomic_write_json(path, report.to_json())
    return path
