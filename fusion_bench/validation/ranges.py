"""What a config option's value must be: a Range says it (`describe`), tells a value outside it (`problem`) and may
warn about a value inside it that is rarely meant (`warning`).

Ranges are declared beside what reads the option: run-level options in fusion_bench/validation/options.py, a
merging method's settings as its function's `ranges` attribute (fusion_bench/merging/*.py), the statistics and
coefficient strategies' in the stages that read them (fusion_bench/stages/statistics.py, learn.py). The validation
pass (fusion_bench/validation/check.py) applies them all before any work. This module imports nothing of the
project but its errors, so the merging methods (the ground floor) can declare ranges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusion_bench.errors import ConfigError

COEF_WARN = 10.0  # |scaling coefficient| above this: a warning (task arithmetic searches 0..1; negation uses -1)
COEF_LIMIT = 1000.0  # above this: refused (the merge is the task vectors blown up, far from any trained model)
SEED_MAX = 2**32 - 1  # Lightning's seed_everything (numpy) accepts 0 .. 2**32 - 1


@dataclass(frozen=True)
class Context:
    """What a range may depend on: the run's tasks (a list of one value per task must have their number)."""

    tasks: tuple[str, ...] = ()


def shown(value: Any) -> str:
    """A value as the user wrote it on the command line: strings quoted, numbers as Python prints them."""
    return repr(value) if isinstance(value, str) else str(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def is_real(value: Any) -> bool:
    """An int or a float, not a bool (YAML's true is no number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class Range:
    """What one option's value must be."""

    def describe(self, ctx: Context) -> str:
        raise NotImplementedError

    def problem(self, value: Any, ctx: Context) -> str | None:
        """Why `value` is outside the range (appended to the option and value in the message); None: inside."""
        raise NotImplementedError

    def warning(self, value: Any, ctx: Context) -> str | None:
        """A value inside the range that is rarely meant: what to say about it (logged before any work)."""
        return None

    def check(self, option: str, value: Any, ctx: Context) -> str | None:
        """Raise ConfigError naming the option, the value and what it must be; return a warning or None."""
        why = self.problem(value, ctx)
        if why is not None:
            raise ConfigError(f"{option}={shown(value)}: {why}")
        warning = self.warning(value, ctx)
        return None if warning is None else f"{option}={shown(value)}: {warning}"


@dataclass(frozen=True)
class Number(Range):
    """A finite real number (an integer with `integer`), in [low, high] with either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    note: str = ""  # what the number is, shown after the range (e.g. "the drop probability")

    def describe(self, ctx: Context | None = None) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.low == self.high:
            where = f" equal to {_num(self.low)}"
        elif self.low is not None and self.high is not None:
            where = (f" in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                     f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            where = f" {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            where = f" {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            where = ""
        return f"{kind}{where}" + (f" ({self.note})" if self.note else "")

    def inside(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def problem(self, value: Any, ctx: Context) -> str | None:
        ok = (isinstance(value, int) if self.integer else is_real(value)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not self.inside(value):
            return f"must be {self.describe(ctx)}"
        return None


def integer(low: int | None = None, high: int | None = None, note: str = "") -> Number:
    return Number(low=low, high=high, integer=True, note=note)


def positive(note: str = "") -> Number:
    return Number(low=0, low_open=True, note=note)


def non_negative(note: str = "") -> Number:
    return Number(low=0, note=note)


def fraction(low_open: bool = False, high_open: bool = False, note: str = "") -> Number:
    return Number(low=0, high=1, low_open=low_open, high_open=high_open, note=note)


COUNT = integer(1)  # steps, batch sizes, samples: at least one
SEED = integer(0, SEED_MAX, note="numpy's seed range")  # a seed numpy or Lightning takes (run seed, LoraHub)
TORCH_SEED = integer(-(2**63), 2**64 - 1)  # a seed only torch generators take: what manual_seed accepts
ANY_NUMBER = Number()  # finite


@dataclass(frozen=True)
class Choice(Range):
    """One of a few values (strings, or numbers such as -1)."""

    values: tuple[Any, ...]

    def describe(self, ctx: Context | None = None) -> str:
        names = [shown(v) for v in self.values]
        return names[0] if len(names) == 1 else f"one of {', '.join(names)}"

    def problem(self, value: Any, ctx: Context) -> str | None:
        same = any(type(value) is type(v) and value == v for v in self.values)
        return None if same else f"must be {self.describe(ctx)}"


def choice(*values: Any) -> Choice:
    return Choice(tuple(values))


@dataclass(frozen=True)
class Pattern(Range):
    """A string matching a regular expression (e.g. Lightning's devices '0,1')."""

    regex: str
    description: str

    def describe(self, ctx: Context | None = None) -> str:
        return self.description

    def problem(self, value: Any, ctx: Context) -> str | None:
        ok = isinstance(value, str) and re.fullmatch(self.regex, value) is not None
        return None if ok else f"must be {self.description}"


@dataclass(frozen=True)
class Flag(Range):
    """true or false (a YAML boolean; a word such as 'yes' on the command line is a string)."""

    def describe(self, ctx: Context | None = None) -> str:
        return "true or false"

    def problem(self, value: Any, ctx: Context) -> str | None:
        return None if isinstance(value, bool) else "must be true or false"


FLAG = Flag()


@dataclass(frozen=True)
class Maybe(Range):
    """null, or a value of `inner`."""

    inner: Range

    def describe(self, ctx: Context) -> str:
        return f"{self.inner.describe(ctx)}, or null"

    def problem(self, value: Any, ctx: Context) -> str | None:
        if value is None or self.inner.problem(value, ctx) is None:
            return None
        return f"must be {self.describe(ctx)}"

    def warning(self, value: Any, ctx: Context) -> str | None:
        return None if value is None else self.inner.warning(value, ctx)


@dataclass(frozen=True)
class AnyOf(Range):
    """A value of one of the alternatives (e.g. a number or 'search')."""

    alternatives: tuple[Range, ...]

    def describe(self, ctx: Context) -> str:
        parts = [a.describe(ctx) for a in self.alternatives]
        return ", ".join(parts[:-1]) + f", or {parts[-1]}" if len(parts) > 1 else parts[0]

    def problem(self, value: Any, ctx: Context) -> str | None:
        if any(a.problem(value, ctx) is None for a in self.alternatives):
            return None
        return f"must be {self.describe(ctx)}"

    def warning(self, value: Any, ctx: Context) -> str | None:
        for a in self.alternatives:
            if a.problem(value, ctx) is None:
                return a.warning(value, ctx)
        return None


def any_of(*alternatives: Range) -> AnyOf:
    return AnyOf(tuple(alternatives))


@dataclass(frozen=True)
class ListOf(Range):
    """A list of values of `item`: one per task (`per_task`), exactly `length`, or `min_len` or more."""

    item: Range
    per_task: bool = False
    length: int | None = None
    min_len: int = 0

    def describe(self, ctx: Context) -> str:
        if self.per_task:
            return f"a list of one value per task ({len(ctx.tasks)}), each {self.item.describe(ctx)}"
        if self.length is not None:
            return f"a list of {self.length} values, each {self.item.describe(ctx)}"
        return f"a list of {f'{self.min_len} or more ' if self.min_len else ''}values, each {self.item.describe(ctx)}"

    def problem(self, value: Any, ctx: Context) -> str | None:
        if not isinstance(value, Sequence) or isinstance(value, str):
            return f"must be {self.describe(ctx)}"
        if self.per_task and len(value) != len(ctx.tasks):
            return f"has {len(value)} values for {len(ctx.tasks)} tasks; must be {self.describe(ctx)}"
        if self.length is not None and len(value) != self.length:
            return f"must be {self.describe(ctx)}"
        if len(value) < self.min_len or any(self.item.problem(v, ctx) is not None for v in value):
            return f"must be {self.describe(ctx)}"
        return None

    def warning(self, value: Any, ctx: Context) -> str | None:
        return next((w for v in value if (w := self.item.warning(v, ctx)) is not None), None)


@dataclass(frozen=True)
class Coefficient(Range):
    """A scaling coefficient: a finite number with |c| <= COEF_LIMIT (a warning above COEF_WARN), with `per_task`
    also a list of one per task, with `search` also 'search' (picked on val by the pipeline)."""

    per_task: bool = True
    search: bool = True
    note: str = ""

    def describe(self, ctx: Context) -> str:
        one = f"a finite number in [-{_num(COEF_LIMIT)}, {_num(COEF_LIMIT)}]"
        parts = [one]
        if self.per_task:
            parts.append(f"a list of one such number per task ({len(ctx.tasks)})")
        if self.search:
            parts.append("'search'")
        text = ", ".join(parts[:-1]) + f", or {parts[-1]}" if len(parts) > 1 else one
        return text + (f" ({self.note})" if self.note else "")

    def _one(self, x: Any) -> bool:
        return is_real(x) and math.isfinite(x) and abs(x) <= COEF_LIMIT

    def problem(self, value: Any, ctx: Context) -> str | None:
        if self.search and value == "search":
            return None
        if self._one(value):
            return None
        if self.per_task and isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != len(ctx.tasks):
                return f"has {len(value)} values for {len(ctx.tasks)} tasks; must be {self.describe(ctx)}"
            if all(self._one(v) for v in value):
                return None
        return f"must be {self.describe(ctx)}"

    def warning(self, value: Any, ctx: Context) -> str | None:
        values = [value] if is_real(value) else list(value) if not isinstance(value, str) else []
        if any(abs(v) > COEF_WARN for v in values):
            return (f"|coefficient| > {_num(COEF_WARN)} is far outside what merges use (the papers search 0..1, "
                    f"negation uses about -1): the merged weights are the task vectors blown up; is it meant?")
        return None


PER_TASK_COEF = Coefficient(per_task=True)
ONE_COEF = Coefficient(per_task=False)


@dataclass(frozen=True)
class TaskNames(Range):
    """A non-empty list of distinct task names (which names a pool has, its model family checks)."""

    def describe(self, ctx: Context | None = None) -> str:
        return "a non-empty list of distinct task names"

    def problem(self, value: Any, ctx: Context) -> str | None:
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            return f"must be {self.describe()}"
        if not all(isinstance(t, str) and t for t in value):
            return f"must be {self.describe()}"
        if len(set(value)) != len(value):
            return f"has duplicates; must be {self.describe()}"
        return None

