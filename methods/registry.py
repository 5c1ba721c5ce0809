"""Method registry: built-ins by lazy import path, third-party methods through entry points.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."eebench.methods"]
    mymethod = "my_package.my_module:MyMethod"

and `eebench methods` / every suite can then run ``mymethod``. Nothing is imported until a method is used
(lm-evaluation-harness style lazy names), except by `list_methods`, which must read class attributes.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from eebench.methods.protocol import ProtocolError, check_method_class

ENTRY_POINT_GROUP = "eebench.methods"

BUILTIN_METHODS: dict[str, str] = {
    "berxit": "eebench.methods.berxit:BERxiT",
    "calm": "eebench.methods.calm:CALM",
    "consistentee": "eebench.methods.consistentee:ConsistentEE",
    "deebert": "eebench.methods.deebert:DeeBERT",
    "hashee": "eebench.methods.hashee:HashEE",
    "pabee": "eebench.methods.pabee:PABEE",
    "pcee": "eebench.methods.pcee:PCEE",
    "trbert": "eebench.methods.trbert:TRBERT",
}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateMethodError(ValueError):
    pass


@dataclass(frozen=True)
class MethodEntry:
    name: str
    target: str          # "module:attr"
    origin: str          # "built-in" or the plugin's distribution name


@dataclass(frozen=True)
class MethodInfo:
    name: str
    granularity: str
    task_kinds: tuple[str, ...]
    knob_names: tuple[str, ...]
    origin: str
    summary: str


def _entries() -> dict[str, MethodEntry]:
    entries = {name: MethodEntry(name, target, "built-in") for name, target in BUILTIN_METHODS.items()}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = point.dist.name if point.dist is not None else "unknown package"
        if point.name in entries:
            other = entries[point.name]
            if other.target == point.value:  # the same package seen twice (e.g. editable + site-packages)
                continue
            raise DuplicateMethodError(
                f"method name '{point.name}' is registered twice: by {other.origin} ({other.target}) and by "
                f"{dist} ({point.value}). Rename the entry point in one package's [project.entry-points."
                f"\"{ENTRY_POINT_GROUP}\"] table.")
        entries[point.name] = MethodEntry(point.name, point.value, dist)
    return entries


def method_entries() -> dict[str, MethodEntry]:
    """Every registered method by name, built-ins first, then plugins in entry-point order (nothing imported)."""
    return _entries()


def method_names() -> list[str]:
    return sorted(_entries())


def _lookup(name: str) -> MethodEntry:
    entries = _entries()
    key = name.strip().lower()
    if key not in entries:
        close = difflib.get_close_matches(key, entries, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownMethodError(f"unknown method '{name}'. Known methods: {', '.join(sorted(entries))}.{hint} "
                                 f"Third-party methods register through the entry-point group '{ENTRY_POINT_GROUP}'.")
    return entries[key]


def get_method_class(name: str) -> type:
    """The class registered under `name`, checked against the EarlyExitMethod protocol."""
    entry = _lookup(name)
    module_name, _, attr = entry.target.partition(":")
    try:
        candidate: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            candidate = getattr(candidate, part)
    except (ImportError, AttributeError) as error:
        raise ProtocolError(f"method '{name}' from {entry.origin} points at '{entry.target}', which cannot be "
                            f"imported: {error}") from error
    check_method_class(candidate, origin=entry.origin)
    if candidate.name != entry.name:
        raise ProtocolError(f"method registered as '{entry.name}' by {entry.origin} says its name is "
                            f"'{candidate.name}': make the entry-point name and the class's `name` agree")
    return candidate


def build_method(name: str, **config_overrides: Any):
    """Instantiate a registered method; keyword overrides go to its config dataclass."""
    return get_method_class(name)(**config_overrides)


def list_methods() -> list[MethodInfo]:
    infos = []
    for name in method_names():
        cls = get_method_class(name)
        infos.append(MethodInfo(name=name, granularity=cls.granularity, task_kinds=tuple(sorted(cls.task_kinds)),
                                knob_names=tuple(cls.knob_names), origin=_lookup(name).origin,
                                summary=docstring_summary(cls.__doc__)))
    return infos


def docstring_summary(doc: str | None) -> str:
    """The first paragraph of a docstring as one line: a summary wrapped over several lines stays whole."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())
