"""One table of merging methods: ``METHODS[name] -> MethodSpec``, keyed by the name of the method's config file
(``conf/method/<name>.yaml``, what ``method=<name>`` selects), declared where each method is defined.

Each merging function says what it is with :func:`merging_method`::

    @merging_method(kind="data-free", affine=True)            # config name = the function's name
    def task_arithmetic(pretrained, finetuned, scaling_coef=0.3): ...

    @merging_method("ties", kind="data-free", affine=True)    # config names, when they differ
    def ties_merging(...): ...

- ``kind``: ``data-free``, ``task-specific`` (returns a TaskSpecificMerge), ``statistics`` (takes one statistic
  per task, ``statistic="gram"`` or ``"fisher"``, or with ``"layer_gram"`` a callable giving the Grams of a partial
  merge layer by layer: RegMean++) or ``coefficients`` (a coefficient strategy over another
  method: :func:`coefficient_method`) -- the four families of DESIGN.md "Method families".
- ``affine``: the merge is ``theta_0 + c * tau_m`` with ``tau_m`` independent of ``c = scaling_coef``, so the
  coefficient search merges once (fusion_bench/evaluation/search.py). Required (True or False) for a function
  that takes ``scaling_coef``, refused for one that does not (its spec says ``affine=None``).
  tests/test_search.py checks the declaration of every method of the table.
- ``modes``: the fine-tuning modes it needs (``("l_lora",)``), None for any; ``linearized``: evaluate the merge
  through the linearized model.

The decorator returns the function itself and keeps the function attributes the pipeline reads
(``affine_in_scaling_coef``, ``requires_mode``, ``evaluate_linearized``); ``ranges`` and ``check_settings``
(fusion_bench/validation) stay plain attributes set next to the function.

Adding a data-free method is two files:

1. ``fusion_bench/merging/<module>.py``: the function with ``@merging_method(...)`` (optionally ``.ranges``).
   Nothing has to import the module: reading the table imports every module of fusion_bench/merging.
2. ``conf/method/<name>.yaml``: ``_target_: fusion_bench.merging.<module>.<function>``, ``_partial_: true``
   and the hyper-parameters (``scaling_coef: search`` to choose it on val).

tests/test_method_table.py then checks that the table and conf/method/ name the same methods (and the same
functions), that the Makefile's method lists name methods of the table, that the sweep claiming every method
runs every one, and that the method merges (tests/test_search.py: affine as declared).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("data-free", "task-specific", "statistics", "coefficients")
# statistic -> the merging function's argument (stages/statistics); layer_gram: RegMean++'s Grams of the partial
# merge, not stored but computed during the merge through a callable (merging/regmean_pp.py)
STATISTICS = {"gram": "grams", "fisher": "fishers", "layer_gram": "layer_grams"}
COEFFICIENT_STRATEGIES = ("adamerging", "adarank", "lorahub")  # conf/coefficients/<strategy>.yaml


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: ``method=<name>`` runs ``function`` with conf/method/<name>.yaml's settings."""

    name: str
    function: Callable[..., Any]
    kind: str
    affine: bool | None  # None: no scaling_coef
    modes: tuple[str, ...] | None = None  # None: every fine-tuning mode
    linearized: bool = False  # evaluated through the linearized model
    statistic: str | None = None  # kind statistics: "gram" | "fisher" | "layer_gram" (method.statistics.kind)
    base: str | None = None  # kind coefficients: the method config it composes (its YAML's defaults)
    strategy: str | None = None  # kind coefficients: conf/coefficients/<strategy>.yaml

    @property
    def takes_coef(self) -> bool:
        return "scaling_coef" in inspect.signature(self.function).parameters

    @property
    def target(self) -> str:
        """``module.function`` (what the YAML's ``_target_`` or its base's names)."""
        return f"{self.function.__module__}.{self.function.__name__}"


_TABLE: dict[str, MethodSpec] = {}
_PENDING: list[dict[str, Any]] = []  # coefficient methods whose base is not declared yet
_DISCOVERED = False


def _add(spec: MethodSpec) -> None:
    old = _TABLE.get(spec.name)
    if old is not None and old.target != spec.target:  # a reloaded module re-declares its own functions
        raise ValueError(f"merging method {spec.name!r} declared twice: by {old.target} and by {spec.target}")
    _TABLE[spec.name] = spec


def merging_method(*names: str, kind: str, affine: bool | None = None, modes: tuple[str, ...] | None = None,
                   linearized: bool = False, statistic: str | None = None) -> Callable[[Callable], Callable]:
    """Declare the decorated merging function under the config names ``names`` (default: its ``__name__``)."""
    if kind not in KINDS or kind == "coefficients":
        raise ValueError(f"merging_method: kind={kind!r} must be one of {KINDS[:3]} "
                         f"(coefficient strategies: coefficient_method)")
    if (kind == "statistics") != (statistic is not None) or (statistic is not None and statistic not in STATISTICS):
        raise ValueError(f"merging_method: kind={kind!r}, statistic={statistic!r}: a statistics method names its "
                         f"statistic ({', '.join(STATISTICS)}), the others none")
    if modes is not None:
        modes = tuple(modes)
        if len(modes) != 1:  # the merge stage checks one mode (requires_mode)
            raise ValueError(f"merging_method: modes={modes!r}: one mode, or None for every mode")

    def declare(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        takes_coef = "scaling_coef" in params
        if takes_coef and not isinstance(affine, bool):
            raise TypeError(f"{fn.__name__} takes scaling_coef: declare affine=True (theta_0 + c * tau_m, tau_m "
                            f"independent of c: searched with one merge) or affine=False")
        if not takes_coef and affine is not None:
            raise TypeError(f"{fn.__name__} takes no scaling_coef: affine={affine!r} means nothing")
        if statistic is not None and STATISTICS[statistic] not in params:
            raise TypeError(f"{fn.__name__}: a {statistic} statistics method takes {STATISTICS[statistic]!r}")
        for name in names or (fn.__name__,):
            _add(MethodSpec(name, fn, kind, affine, modes, linearized, statistic))
        # the attributes the pipeline reads (stages/merge.py, evaluation/search.py, export)
        if affine is not None:
            fn.affine_in_scaling_coef = affine
        if modes is not None:
            fn.requires_mode = modes[0]
        if linearized:
            fn.evaluate_linearized = True
        return fn

    return declare


def coefficient_method(name: str, *, base: str, strategy: str) -> None:
    """Declare ``method=<name>``: the method config ``base`` (e.g. task_arithmetic) with its coefficients learnt by
    ``strategy`` (conf/coefficients/<strategy>.yaml); no function attribute changes."""
    if strategy not in COEFFICIENT_STRATEGIES:
        raise ValueError(f"coefficient_method: strategy={strategy!r} must be one of {COEFFICIENT_STRATEGIES}")
    _PENDING.append({"name": name, "base": base, "strategy": strategy})
    _resolve()


def _resolve() -> None:
    for p in list(_PENDING):
        base = _TABLE.get(p["base"])
        if base is None:
            continue
        _PENDING.remove(p)
        _add(MethodSpec(p["name"], base.function, "coefficients", base.affine, base.modes, base.linearized,
                        base=p["base"], strategy=p["strategy"]))


def _discover() -> None:
    """Import every module of fusion_bench/merging once (each declares its methods), then resolve the bases."""
    global _DISCOVERED
    if not _DISCOVERED:
        import fusion_bench.merging as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "registry":
                importlib.import_module(f"{package.__name__}.{info.name}")
        _DISCOVERED = True
    _resolve()
    if _PENDING:
        raise ValueError(f"coefficient methods over undeclared bases: {_PENDING}")


def methods() -> dict[str, MethodSpec]:
    """The whole table (every module of fusion_bench/merging imported)."""
    _discover()
    return _TABLE


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # read lazily: the table is complete once every module has declared its methods
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def markdown() -> str:
    """The table as Markdown (docs/methods.md "The table of methods" is this text; tests/test_method_table.py)."""
    rows = ["| `method=` | kind | affine in scaling_coef | fine-tuning modes | function |", "|---|---|---|---|---|"]
    for name, s in sorted(methods().items()):
        affine = "-" if s.affine is None else "yes" if s.affine else "no"
        modes = ", ".join(s.modes) if s.modes else "any"
        extra = (f" ({s.statistic})" if s.statistic else f" ({s.strategy} over {s.base})" if s.base else "")
        rows.append(f"| `{name}` | {s.kind}{extra} | {affine} | {modes}{' (evaluated linearized)' * s.linearized} "
                    f"| `{s.target}` |")
    return "\n".join(rows) + "\n"

