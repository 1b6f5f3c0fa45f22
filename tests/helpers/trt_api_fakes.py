"""Fakes derived from the real TensorRT Python bindings (used by ``trt_api_driver.py``).

The real ``tensorrt_bindings`` extension is imported (its C entry points are stubs that create
nothing), so its classes, enums and pybind11 signatures are the real ones of that release. A fake
object stands for an instance of a real class:

- every attribute sd35trt reads must exist on the real class (else ``AttributeError`` naming the
  TensorRT version and class);
- every method call must bind to one of the real pybind11 signatures parsed from ``__doc__``,
  argument types included (``int``, ``bool``, ``str``, buffers, dims, enums, other classes);
- every attribute sd35trt sets must be a real property with a setter, its value of the setter's type.

What the calls *do* comes from a small simulated TensorRT (:class:`World`): the parser reads the
real ONNX file's inputs and outputs, plans are bytes the world can deserialize again, contexts
write into the addresses bound to them. Enums, ``Logger``, ``Dims`` and ``IProgressMonitor`` are
the real objects.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import re
import sys
import types
from collections.abc import Callable
from typing import Any

_PREFIX = re.compile(r"\b(?:tensorrt_bindings\.)?tensorrt\.(?!\w+\.)")


class ApiMismatch(TypeError):
    """A call that does not bind to any real signature, or a value of the wrong type."""


# -- pybind11 signatures ---------------------------------------------------------------------


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<{":
            depth += 1
        elif ch in "])>}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse_signatures(doc: str | None, name: str) -> list[tuple[inspect.Signature, dict[str, str], str]]:
    """``[(signature, {param: type}, return type)]`` of every overload documented in ``doc``."""
    if not doc:
        return []
    pattern = re.compile(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$")
    out = []
    for line in doc.splitlines():
        m = pattern.match(line.strip())
        if not m or m.group(1).strip() == "*args, **kwargs":
            continue
        params, types_ = [], {}
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        for raw in _split_top(m.group(1)):
            if raw == "*":
                kind = inspect.Parameter.KEYWORD_ONLY
                continue
            if raw == "/":
                params = [p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in params]
                continue
            pname, _, rest = raw.partition(":")
            annotation, _, default = rest.partition(" = ")
            pname = pname.strip()
            types_[pname] = _PREFIX.sub("", annotation.strip())
            params.append(
                inspect.Parameter(
                    pname, kind, default=default.strip() if default else inspect.Parameter.empty
                )
            )
        out.append((inspect.Signature(params), types_, _PREFIX.sub("", m.group(2))))
    return out


# -- type checks -----------------------------------------------------------------------------


def _check(real: types.ModuleType, annotation: str, value: Any) -> bool:
    a = annotation.strip()
    if a.startswith("typing.Optional[") or a.endswith("| None"):
        inner = a[len("typing.Optional[") : -1] if a.startswith("typing.Optional[") else a[: -len("| None")]
        return value is None or _check(real, inner, value)
    if a in ("int", "typing.SupportsInt"):
        return (isinstance(value, int) and not isinstance(value, bool)) or hasattr(value, "__index__")
    if a in ("float", "typing.SupportsFloat"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if a == "bool":
        return isinstance(value, bool)
    if a == "str":
        return isinstance(value, str)
    if a in ("typing_extensions.Buffer", "buffer", "collections.abc.Buffer"):
        try:
            memoryview(value)
        except TypeError:
            return False
        return True
    if a == "Dims" or a.startswith("Dims"):
        if isinstance(value, real.Dims):
            return True
        return isinstance(value, tuple | list) and all(isinstance(v, int) for v in value)
    if a.startswith(("list[", "collections.abc.Sequence[", "typing.Sequence[")):
        return isinstance(value, list | tuple)
    cls = getattr(real, a, None)
    if isinstance(cls, type):
        if isinstance(value, Fake):
            return issubclass(object.__getattribute__(value, "_fake_real"), cls)
        return isinstance(value, cls)
    return True  # object, capsule, numpy arrays, ...: not checked


# -- fakes -----------------------------------------------------------------------------------


class Fake:
    """Base of the fake classes; see :func:`fake_class`."""

    _fake_real: type
    _fake_world: World


def _doc_of(attr: Any) -> str | None:
    return getattr(attr, "__doc__", None)


def _bind(
    real, cls_name: str, method: str, doc: str | None, args: tuple, kwargs: dict
) -> inspect.BoundArguments:
    overloads = parse_signatures(doc, method)
    if not overloads:
        raise ApiMismatch(f"{cls_name}.{method} has no parsable signature in TensorRT {real.__version__}")
    problems = []
    for sig, types_, _ in overloads:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            problems.append(str(err))
            continue
        wrong = [
            f"{k}={v!r} is not {types_[k]}"
            for k, v in bound.arguments.items()
            if k in types_ and k not in ("self", "arg0") and not _check(real, types_[k], v)
        ]
        if not wrong:
            return bound
        problems.append(", ".join(wrong))
    raise ApiMismatch(
        f"TensorRT {real.__version__}: {cls_name}.{method}(args={args[1:]!r}, kwargs={kwargs!r}) "
        f"matches no signature: {'; '.join(problems)}"
    )


def _returns(doc: str | None, method: str) -> str:
    overloads = parse_signatures(doc, method)
    return overloads[0][2] if overloads else "None"


def fake_class(real_cls: type, world: World) -> type:
    """A class standing for ``real_cls``: checked attributes, calls bound to the real signatures."""
    real = world.real
    name = real_cls.__name__
    base: tuple[type, ...] = (Fake, bytes) if name == "IHostMemory" else (Fake,)

    def __init__(self, *args, **kwargs):
        if real_cls.__init__ is object.__init__:
            raise ApiMismatch(f"{name} cannot be constructed")
        _bind(real, name, "__init__", _doc_of(real_cls.__init__), (self, *args), kwargs)
        object.__setattr__(self, "_fake_props", {})
        world.record(name, "__init__", args, kwargs)
        world.constructed(name, self, args, kwargs)

    def __getattribute__(self, attr):
        if attr.startswith("_fake") or (attr.startswith("__") and attr.endswith("__")):
            return object.__getattribute__(self, attr)
        if not hasattr(real_cls, attr):
            raise AttributeError(f"TensorRT {real.__version__}: {name} has no attribute {attr!r}")
        static = inspect.getattr_static(real_cls, attr)
        if isinstance(static, property):
            world.record(name, attr, (), {})
            props = object.__getattribute__(self, "_fake_props")
            if attr in props:
                return props[attr]
            return world.get(name, self, attr, _returns(_doc_of(static.fget), ""))
        if callable(static) or isinstance(static, types.BuiltinFunctionType | staticmethod):
            doc = _doc_of(getattr(real_cls, attr))

            def call(*args, **kwargs):
                _bind(real, name, attr, doc, (self, *args), kwargs)
                world.record(name, attr, args, kwargs)
                return world.call(name, self, attr, args, kwargs, _returns(doc, attr))

            return call
        return getattr(real_cls, attr)  # nested enums and constants

    def __setattr__(self, attr, value):
        if attr.startswith("_fake"):
            return object.__setattr__(self, attr, value)
        static = inspect.getattr_static(real_cls, attr, None)
        if not isinstance(static, property) or static.fset is None:
            raise AttributeError(f"TensorRT {real.__version__}: {name}.{attr} is not a settable property")
        setter = parse_signatures(_doc_of(static.fset), "")
        if setter:
            kind = list(setter[0][1].values())[-1]
            if not _check(real, kind, value):
                raise ApiMismatch(f"TensorRT {real.__version__}: {name}.{attr} = {value!r} is not {kind}")
        world.record(name, f"{attr}=", (value,), {})
        object.__getattribute__(self, "_fake_props")[attr] = value
        return None

    def __repr__(self):
        return f"<fake {name}>"

    ns = {
        "__init__": __init__,
        "__getattribute__": __getattribute__,
        "__setattr__": __setattr__,
        "__repr__": __repr__,
        "_fake_real": real_cls,
        "_fake_world": world,
    }
    if name == "IHostMemory":
        ns["__new__"] = lambda cls, data=b"": bytes.__new__(cls, data)
        ns["__init__"] = lambda self, data=b"": object.__setattr__(self, "_fake_props", {})
    return type(f"Fake{name}", base, ns)


class World:
    """The simulated TensorRT behind the fakes, and the log of every API use."""

    def __init__(self, real: types.ModuleType) -> None:
        self.real = real
        self.calls: list[tuple[str, str, str]] = []
        self.classes: dict[str, type] = {}
        self.plans: dict[bytes, dict] = {}
        self.behaviour: dict[tuple[str, str], Callable] = {}
        self.facts: dict[str, Any] = {}

    def fake(self, name: str) -> type:
        if name not in self.classes:
            self.classes[name] = fake_class(getattr(self.real, name), self)
        return self.classes[name]

    def new(self, name: str, **props) -> Any:
        obj = object.__new__(self.fake(name))
        object.__setattr__(obj, "_fake_props", {})
        for k, v in props.items():
            object.__getattribute__(obj, "_fake_props")[k] = v
        return obj

    def record(self, cls: str, attr: str, args: tuple, kwargs: dict) -> None:
        shown = ", ".join([_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kwargs.items()])
        self.calls.append((cls, attr, shown))

    def constructed(self, name: str, obj: Any, args: tuple, kwargs: dict) -> None:
        hook = self.behaviour.get((name, "__init__"))
        if hook is not None:
            hook(obj, *args, **kwargs)

    def get(self, cls: str, obj: Any, attr: str, returns: str) -> Any:
        hook = self.behaviour.get((cls, attr))
        return hook(obj) if hook is not None else self.default(returns)

    def call(self, cls: str, obj: Any, attr: str, args: tuple, kwargs: dict, returns: str) -> Any:
        hook = self.behaviour.get((cls, attr))
        return hook(obj, *args, **kwargs) if hook is not None else self.default(returns)

    def default(self, returns: str) -> Any:
        r = returns.strip()
        if r in ("None", ""):
            return None
        if r == "bool":
            return True
        if r == "int":
            return 0
        if r == "str":
            return ""
        cls = getattr(self.real, r, None)
        if isinstance(cls, type) and not hasattr(cls, "__members__"):
            return self.new(r)
        raise ApiMismatch(f"the simulated TensorRT has no behaviour returning {r}")


def _show(value: Any) -> str:
    if isinstance(value, Fake):
        return f"<{object.__getattribute__(value, '_fake_real').__name__}>"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{type(value).__name__} {len(memoryview(value))} bytes>"
    if hasattr(value, "__members__") or type(value).__module__.startswith("tensorrt"):
        return str(value)
    try:
        json.dumps(value)
    except TypeError:
        return f"<{type(value).__name__}>"
    return repr(value)


class FakeModule(types.ModuleType):
    """``tensorrt`` as sd35trt imports it: the real module, with constructible classes faked."""

    def __init__(self, real: types.ModuleType, world: World, faked: tuple[str, ...]) -> None:
        super().__init__("tensorrt")
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_faked", {n: world.fake(n) for n in faked})
        self.__version__ = real.__version__

    def __getattr__(self, name: str) -> Any:
        faked = object.__getattribute__(self, "_faked")
        if name in faked:
            return faked[name]
        return getattr(object.__getattribute__(self, "_real"), name)


def install(real: types.ModuleType, world: World) -> FakeModule:
    """Make ``import tensorrt`` give the fake module (the constructible classes faked)."""
    module = FakeModule(real, world, ("Builder", "Runtime", "OnnxParser", "Refitter"))
    sys.modules["tensorrt"] = module
    return module


def write_pattern(address: int, nbytes: int, byte: int) -> None:
    """What a simulated kernel does: fill an output buffer (a real host address here)."""
    ctypes.memset(address, byte, nbytes)
