"""Command-line options derived from declarations made once elsewhere: the generation
parameters (:func:`generation_options`) and the fields of a pydantic settings model
(:func:`settings_options`), so no command spells an option out again.
"""

from __future__ import annotations

import enum
import functools
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sd35trt.errors import ConfigError
from sd35trt.parameters import PARAMS, RECORDED_DEFAULT, InputParam, Kind

if TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

_PYTHON_TYPE = {Kind.TEXT: str, Kind.INT: int, Kind.FLOAT: float, Kind.BOOL: bool, Kind.IMAGE: Path}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _parameter(
    p: InputParam,
    default: Any,
    argument: bool,
    *,
    own_default: bool = False,
    defaults_from: str | None = None,
) -> inspect.Parameter:
    """The typer parameter (an option, or an argument such as PROMPT) of one declared parameter.

    ``own_default``: the command gives it a default of its own (shown by typer), so the declared
    "(default: ...)" is dropped from the help; ``defaults_from`` replaces "the engines' recorded" in
    it for a command that has no engines (``reference``: "the config's runtime section")."""
    kind = inspect.Parameter.KEYWORD_ONLY
    text = p.help
    if own_default:
        text = re.sub(r" \(default: [^)]*\)", "", text)
    elif defaults_from is not None:
        text = text.replace(RECORDED_DEFAULT, f"(default: {defaults_from})")
    if argument:
        info = typer.Argument(metavar=p.name.upper(), help=_sentence(text))
        return inspect.Parameter(p.name, kind, annotation=Annotated[_PYTHON_TYPE[p.kind], info])
    help_text = _sentence(text)
    if p.kind is Kind.BOOL:
        info = typer.Option(_bool_flags(p.name), help=help_text, show_default=False)
    else:
        info = typer.Option(_flag(p.name), help=help_text)
    annotation = _PYTHON_TYPE[p.kind] if default is not None else _PYTHON_TYPE[p.kind] | None
    if p.per_controlnet:  # repeatable, paired in order with --control-image
        annotation = list[_PYTHON_TYPE[p.kind]] | None
    return inspect.Parameter(p.name, kind, default=default, annotation=Annotated[annotation, info])


#: Python name prefix of the alias options (``alias__steps``), whose values move to their parameter.
_ALIAS_PREFIX = "alias__"


def _alias_parameters(p: InputParam) -> list[inspect.Parameter]:
    """An option of its own per alias (``--steps``), so that giving the name and an alias together
    is refused rather than the last one silently winning (see :func:`_take_alias`)."""
    kind = inspect.Parameter.KEYWORD_ONLY
    annotation = _PYTHON_TYPE[p.kind] | None
    return [
        inspect.Parameter(
            _ALIAS_PREFIX + a,
            kind,
            default=None,
            annotation=Annotated[annotation, typer.Option(_flag(a), help=f"Same as {_flag(p.name)}.")],
        )
        for a in p.aliases
    ]


def _take_alias(p: InputParam, kwargs: dict[str, Any]) -> None:
    """Move an alias option's value in ``kwargs`` to ``p``'s own name (an aliased option has no
    default of its own: ``None`` is "not given", the engines' default applies).

    Raises:
        ConfigError: the name and an alias (or two aliases) were both given on the command line.
    """
    names = (p.name, *(_ALIAS_PREFIX + a for a in p.aliases))
    given = [n.removeprefix(_ALIAS_PREFIX) for n in names if kwargs.get(n) is not None]
    if len(given) > 1:
        raise ConfigError(f"{_flag(given[0])} and {_flag(given[1])} are the same parameter; give one of them")
    for a in p.aliases:
        value = kwargs.pop(_ALIAS_PREFIX + a)
        if value is not None:
            kwargs[p.name] = value


def _one_or_list(p: InputParam, value: Any) -> Any:
    """A repeatable option's values as the request takes them: none given -> ``None``, one -> that
    value (for every control image), several -> the list."""
    if not p.per_controlnet or value is None:
        return value
    values = list(value)
    return None if not values else values[0] if len(values) == 1 else values


def _bool_flags(name: str) -> str:
    return f"{_flag(name)}/--no-{_flag(name)[2:]}"


def generation_options(
    *names: str, defaults: Mapping[str, Any] | None = None, defaults_from: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so that it takes the declared parameters ``names`` as options.

    The command's own parameters stay; it must have a parameter ``generation``, which receives
    ``{name: value}`` of the declared ones (``None``: not given, the engines' default applies).
    The declared ones come first in ``--help`` (the prompt argument first of all).

    Args:
        names: declared parameter names (:data:`sd35trt.parameters.PARAMS`), in help order.
        defaults: per-command defaults that replace the declared ones (e.g. ``seed=0``); a
            required parameter given a default here is an option (``--prompt``), not an argument.
        defaults_from: where the defaults come from when not the engines' records.
    """
    defaults = dict(defaults or {})
    declared = [
        _parameter(
            PARAMS[n],
            defaults.get(n, PARAMS[n].default),
            PARAMS[n].required and n not in defaults,
            own_default=defaults.get(n) is not None,
            defaults_from=defaults_from,
        )
        for n in names
    ]
    aliased = [n for n in names if PARAMS[n].aliases and PARAMS[n].kind is not Kind.BOOL]
    if any(defaults.get(n, PARAMS[n].default) is not None for n in aliased):
        raise TypeError(f"an aliased option needs the default None: {aliased}")  # a programming error
    declared += [a for n in aliased for a in _alias_parameters(PARAMS[n])]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)  # typer reads real annotations
        own = [p for p in signature.parameters.values() if p.name != "generation"]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            for n in aliased:
                _take_alias(PARAMS[n], kwargs)
            generation = {n: _one_or_list(PARAMS[n], kwargs.pop(n)) for n in names}
            return command(**kwargs, generation=generation)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = inspect.Signature([*declared, *keyword])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in (*declared, *keyword)}
        return wrapper

    return decorate


def settings_flag(field: str) -> str:
    """The option of a settings field: ``--queue-size``; a seconds suffix is left out (``timeout_s``:
    ``--timeout``), as the option's help states the unit."""
    return _flag(field.removesuffix("_s"))


def _setting(name: str, field: FieldInfo) -> inspect.Parameter:
    """The typer option of one settings field: its type, default and description; the bounds are
    the model's to check (:func:`settings_options`), so they are written only there."""
    annotation = field.annotation
    optional = type(None) in typing.get_args(annotation)
    base = next(t for t in (*typing.get_args(annotation), annotation) if t is not type(None))
    if isinstance(base, type) and issubclass(base, enum.Enum):
        base = str  # checked by the model, any case: --log-level INFO
    default = field.get_default(call_default_factory=True)
    if base is bool:
        info = typer.Option(_bool_flags(name), help=_sentence(field.description or name))
    else:
        info = typer.Option(settings_flag(name), help=_sentence(field.description or name) + _bounds(field))
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[base | None if optional else base, info],
    )


def _bounds(field: FieldInfo) -> str:
    """`` [>= 1, <= 100000]``: the field's bounds as the help shows them (empty without any)."""
    found = {op: getattr(m, name) for m in field.metadata for name, op in _BOUNDS if hasattr(m, name)}
    return f" [{', '.join(f'{op} {v}' for op, v in found.items())}]" if found else ""


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def settings_options(
    model: Callable[[], type[BaseModel]], *, skip: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so that it takes the fields of a settings model as options.

    The command's own parameters come first; it must have a parameter ``settings``, which receives
    the validated model. A field the command sets itself (e.g. from an option of another shape) is
    named in ``skip`` and left at its default.

    Args:
        model: returns the settings class. It is called when typer first reads the command (to run
            it or show its help), so importing the CLI imports neither pydantic nor the model.
        skip: fields that are no option.

    Raises (from the decorated command):
        ConfigError: an option outside its field's bounds or choices, naming the option and the value.
    """
    return lambda command: _SettingsCommand(command, model, tuple(skip))


class _SettingsCommand:
    """A command taking a settings model's fields as options; made when typer first reads its signature."""

    def __init__(
        self, command: Callable[..., Any], model: Callable[[], type[BaseModel]], skip: tuple
    ) -> None:
        self.command, self._model, self.skip = command, model, skip
        self.__name__, self.__qualname__ = command.__name__, command.__qualname__
        self.__doc__, self.__module__ = command.__doc__, command.__module__

    @functools.cached_property
    def model(self) -> type[BaseModel]:
        return self._model()

    @functools.cached_property
    def fields(self) -> dict[str, FieldInfo]:
        return {n: f for n, f in self.model.model_fields.items() if n not in self.skip}

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        # the command annotates ``settings`` with the model's name, imported only for type checkers
        own = inspect.signature(self.command, eval_str=True, locals={self.model.__name__: self.model})
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.parameters.values()]
        declared = [_setting(n, f) for n, f in self.fields.items()]
        return inspect.Signature([*(p for p in keyword if p.name != "settings"), *declared])

    @property
    def __annotations__(self) -> dict[str, Any]:  # typer reads the options' types here too
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        values = {n: kwargs.pop(n) for n in self.fields}
        try:
            settings = self.model(**{n: _choice(self.fields[n], v) for n, v in values.items()})
        except ValidationError as err:
            first = err.errors()[0]
            name = str(first["loc"][0])
            raise ConfigError(f"{settings_flag(name)} {values[name]!r}: {first['msg']}") from None
        return self.command(**kwargs, settings=settings)


def _choice(field: FieldInfo, value: Any) -> Any:
    """An enum field's option in lower case (``--log-level INFO``); other values as given."""
    is_enum = isinstance(field.annotation, type) and issubclass(field.annotation, enum.Enum)
    return value.lower() if is_enum and isinstance(value, str) else value
