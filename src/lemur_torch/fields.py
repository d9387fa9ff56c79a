"""Typed schema fields the config dataclasses are made of: choices (enums) and bounded numbers.

OmegaConf checks a value's type when the config is composed (an `int` field rejects "abc", an Enum field
rejects a name it does not have). It has no ranges, so a bounded number carries its bounds in the dataclass
field's metadata, next to its type and default, and `check_bounds` walks the schema once and checks every
bound. A range is thus written where the field is declared, not in a check somewhere else.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional


class Choice(str, Enum):
    """An enum whose members are their own names (OmegaConf looks members up by name) and behave as the plain
    strings they are: `cfg.model.attention == "sdpa"`, f-strings and dict keys see "sdpa"."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def names(cls) -> str:
        return ", ".join(m.value for m in cls)


@dataclass(frozen=True)
class Bounds:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    hint: str = ""  # what to do, appended to the error

    def violation(self, value: float) -> Optional[str]:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        for bound, ok, word in (
            (self.ge, lambda b: value >= b, ">="),
            (self.gt, lambda b: value > b, ">"),
            (self.le, lambda b: value <= b, "<="),
            (self.lt, lambda b: value < b, "<"),
        ):
            if bound is not None and not ok(bound):
                return f"must be {word} {_num(bound)}, got {_num(value)}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def bounded(default: Any, *, ge=None, gt=None, le=None, lt=None, hint: str = "") -> Any:
    """A dataclass field with a default and bounds (a None value, where the type is Optional, is not checked)."""
    return field(default=default, metadata={"bounds": Bounds(ge, gt, le, lt, hint)})


def check_bounds(cfg: Any, schema: type, prefix: str, fail: Callable[[str, str], Exception]) -> None:
    """Check every bounded field of the dataclass `schema` (and of nested dataclasses, also inside dicts, e.g.
    data.sources.<name>) against the composed config `cfg`; raise fail(key, message) for the first violation."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in cfg or cfg[f.name] is None:
            continue
        key, value, t = f"{prefix}.{f.name}" if prefix else f.name, cfg[f.name], hints[f.name]
        bounds = f.metadata.get("bounds")
        problem = bounds.violation(value) if bounds is not None else None
        if problem:
            raise fail(key, problem + (f"; {bounds.hint}" if bounds.hint else ""))
        if dataclasses.is_dataclass(t):
            check_bounds(value, t, key, fail)
        elif typing.get_origin(t) is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            for name in value:
                check_bounds(value[name], typing.get_args(t)[1], f"{key}.{name}", fail)
