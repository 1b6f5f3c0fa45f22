"""Command-line options derived from the declared generation parameters.

:func:`generation_options` adds the options of :data:`sd35trt.parameters.GENERATION_PARAMS` to a
typer command: ``--num-inference-steps`` with its alias ``--steps``, the declared help, a
``--flag/--no-flag`` pair for booleans, a file path for the image. The command receives them as
one mapping, so no command spells a parameter out again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from sd35trt.parameters import PARAMS, InputParam, Kind

_PYTHON_TYPE = {Kind.TEXT: str, Kind.INT: int, Kind.FLOAT: float, Kind.BOOL: bool, Kind.IMAGE: Path}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parameter(p: InputParam, default: Any, argument: bool) -> inspect.Parameter:
    """The typer parameter (an option, or an argument such as PROMPT) of one declared parameter."""
    kind = inspect.Parameter.KEYWORD_ONLY
    if argument:
        info = typer.Argument(metavar=p.name.upper(), help=p.help[:1].upper() + p.help[1:] + ".")
        return inspect.Parameter(p.name, kind, annotation=Annotated[_PYTHON_TYPE[p.kind], info])
    help_text = p.help[:1].upper() + p.help[1:] + "."
    if p.kind is Kind.BOOL:
        flags = (f"{_flag(p.name)}/--no-{_flag(p.name)[2:]}",)
        info = typer.Option(*flags, help=help_text, show_default=False)
    else:
        info = typer.Option(_flag(p.name), *(_flag(a) for a in p.aliases), help=help_text)
    annotation = _PYTHON_TYPE[p.kind] if default is not None else _PYTHON_TYPE[p.kind] | None
    return inspect.Parameter(p.name, kind, default=default, annotation=Annotated[annotation, info])


def generation_options(
    *names: str, defaults: Mapping[str, Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so that it takes the declared parameters ``names`` as options.

    The command's own parameters stay; it must have a parameter ``generation``, which receives
    ``{name: value}`` of the declared ones (``None``: not given, the engines' default applies).
    The declared ones come first in ``--help`` (the prompt argument first of all).

    Args:
        names: declared parameter names (:data:`sd35trt.parameters.PARAMS`), in help order.
        defaults: per-command defaults that replace the declared ones (e.g. ``seed=0``); a
            required parameter given a default here is an option (``--prompt``), not an argument.
    """
    defaults = dict(defaults or {})
    declared = [
        _parameter(PARAMS[n], defaults.get(n, PARAMS[n].default), PARAMS[n].required and n not in defaults)
        for n in names
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)  # typer reads real annotations
        own = [p for p in signature.parameters.values() if p.name != "generation"]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            generation = {n: kwargs.pop(n) for n in names}
            return command(**kwargs, generation=generation)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = inspect.Signature([*declared, *keyword])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in (*declared, *keyword)}
        return wrapper

    return decorate
