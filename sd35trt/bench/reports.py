"""Typed JSON reports (``bench.json``, ``eval.json``): their base model, reading and writing.

The writer and every reader (figures, scripts) share one pydantic schema instead of guessing keys.
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
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ReportError(validation_message(err, str(path))) from None


def write_report(path: str | Path, report: ReportModel) -> Path:
    """Write ``report`` as JSON atomically (no half-written file at ``path``); returns the path."""
    path = Path(path)
    atomic_write_json(path, report.to_json())
    return path


def fmt_number(value: float | None, digits: int = 2, none: str = "-") -> str:
    """``value`` with ``digits`` decimals, or ``none`` for a missing value (an infinite PSNR: ``inf``)."""
    return none if value is None else f"{value:.{digits}f}"
