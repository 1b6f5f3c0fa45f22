"""``multipart/form-data`` bodies, as OpenAI's ``POST /v1/images/edits`` sends them, parsed with the
standard library's MIME parser (``email``), so the server needs no form library."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass, field
from typing import Any

from sd35trt.errors import RequestError
from sd35trt.parameters import BY_WIRE_NAME, Kind

#: Form fields of OpenAI's edits request that are integers without being generation parameters.
_OPENAI_INTEGERS = ("n",)


@dataclass
class Form:
    """A parsed form: text fields by name, files by field name (the bytes of each, in order)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


def parse_multipart(content_type: str, body: bytes) -> Form:
    """Split a ``multipart/form-data`` body into its text fields and files.

    Raises:
        RequestError: not ``multipart/form-data`` with a boundary, a part without a name, or a
            text field given twice (field ``body``, or the field named).
    """
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise RequestError(
            "body", f"content type {content_type or '(none)'!r} is not multipart/form-data with a boundary"
        )
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError("body", "the multipart body has no parts (check the boundary)")
    form = Form()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise RequestError("body", "a part of the multipart body has no name (Content-Disposition)")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            form.files.setdefault(str(name), []).append(data)
            continue
        if name in form.fields:
            raise RequestError(str(name), f"{name} is given twice")
        try:
            form.fields[str(name)] = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(str(name), f"{name} is not valid UTF-8 text (byte {err.start})") from None
    return form


def typed_fields(fields: dict[str, str]) -> dict[str, Any]:
    """Form text as the JSON types the declared parameters take (``"4"`` -> 4 for ``steps``; other
    names stay text, for the body to refuse or accept).

    Raises:
        RequestError: a value that is not of its parameter's type (named).
    """
    out: dict[str, Any] = {}
    for name, text in fields.items():
        param = BY_WIRE_NAME.get(name)
        kind = Kind.INT if name in _OPENAI_INTEGERS else (param.kind if param else Kind.TEXT)
        value = text.strip()
        try:
            if kind is Kind.INT:
                out[name] = int(value)
            elif kind is Kind.FLOAT:
                out[name] = float(value)
            elif kind is Kind.BOOL:
                out[name] = {"true": True, "false": False}[value.lower()]
            else:
                out[name] = text
        except (ValueError, KeyError):
            wanted = {Kind.INT: "an integer", Kind.FLOAT: "a number", Kind.BOOL: "true or false"}[kind]
            raise RequestError(name, f"{name} {text[:40]!r} is not {wanted}") from None
    return out
