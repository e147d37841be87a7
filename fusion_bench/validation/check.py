"""The validation pass over the resolved config, before any work (data, pretrained weights, fine-tuning).

`check_options(cfg)` checks, from the config alone, the type and range of every option and raises one ConfigError
naming the option, the value given and what it must be (fusion_bench.pipeline.validate_config runs it first, then
the checks that need the stages or the model family: items 5 and 6 below):

1. run-level options (fusion_bench/validation/options.py);
2. the merging method's settings, from the method's own declaration on the function `method._target_` names:
   `ranges`, a dict of setting -> Range (or a function of the given settings returning one, when a range depends
   on another setting), and optionally `check_settings(settings, ctx)` (relations between settings); a setting
   the function does not take is refused;
3. the coefficient strategy blocks (`coefficients`, `method.coefficients`) and the statistics block
   (`method.statistics`), whose ranges are in fusion_bench/validation/options.py; the SVC block (`method.svc`,
   post=svc), whose ranges are there too (whether SVC can follow the method: item 5);
4. any other number in the config must be finite;
5. (pipeline.validate_config) method.task_coefs, finetune.workers, the objective, method.svc after the method;
6. (pipeline.validate_config, families.build_family) the model family's own checks (task names, modes,
   finetuned_from files exist, ...) and the output format.

Values inside a range that are rarely meant (a scaling coefficient beyond +-10) are logged as warnings.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusion_bench.errors import ConfigError
from fusion_bench.validation.options import (
    ORDERED_PAIRS,
    RUN_OPTIONS,
    STATISTICS_RANGES,
    STRATEGY_RANGES,
    SVC_RANGES,
)
from fusion_bench.validation.ranges import PER_TASK_COEF, Context, Range, is_real, shown

log = logging.getLogger(__name__)

HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
PIPELINE_KEYS = ("statistics", "coefficients", "task_coefs", "svc")  # method blocks read by the stages, not the function


def check_options(cfg: DictConfig) -> list[str]:
    """Types and ranges of every option, from the config alone (no family, no file, no data); the warnings."""
    values = OmegaConf.to_container(cfg, resolve=True)
    found = dict(_leaves(values))
    warnings = [RUN_OPTIONS["taskpool.tasks"].check("taskpool.tasks", found.get("taskpool.tasks"), Context())]
    ctx = Context(tasks=tuple(found["taskpool.tasks"]))
    checked = {"taskpool.tasks"}
    for option, rng in RUN_OPTIONS.items():
        if option in found and option not in checked:
            warnings.append(rng.check(option, found[option], ctx))
            checked.add(option)
    for low, high, op in ORDERED_PAIRS:
        if low in found and high in found and not (found[low] < found[high] if op == "<" else found[low] <= found[high]):
            raise ConfigError(f"{low}={shown(found[low])} and {high}={shown(found[high])}: {low} must be {op} {high}")
    if isinstance(values.get("method"), Mapping):
        # stage=finetune merges nothing: the relations between a method's settings and the tasks do not apply
        warnings += _check_method(values["method"], ctx, checked, relations=values.get("stage") != "finetune")
    for prefix in ("coefficients", "method.coefficients"):
        block = _at(values, prefix)
        if isinstance(block, Mapping):
            warnings += _check_strategy(prefix, block, ctx, checked)
    svc = values["method"].get("svc") if isinstance(values.get("method"), Mapping) else None
    if svc is not None:  # its relations to the method and the run: stages/merge.py check_svc
        if not isinstance(svc, Mapping):
            raise ConfigError(f"method.svc={shown(svc)}: must be a block of settings ({', '.join(SVC_RANGES)}), "
                              f"or null")
        warnings += _check_block("method.svc", svc, SVC_RANGES, ctx, checked)
    for option, value in found.items():  # whatever no range covers: at least a finite number
        if option not in checked and is_real(value) and not math.isfinite(value):
            raise ConfigError(f"{option}={shown(value)}: must be a finite number")
    return [w for w in warnings if w]


def method_function(method: Mapping) -> Callable:
    """The merging function `method._target_` names (not called)."""
    from hydra.utils import get_method

    target = method.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"method._target_={shown(target)}: must name a merging function, e.g. "
                          f"fusion_bench.merging.task_arithmetic")
    try:
        return get_method(target)
    except Exception as e:  # hydra wraps import errors in several types
        raise ConfigError(f"method._target_={target!r}: no such function ({e})") from e


def method_ranges(fn: Callable, settings: Mapping[str, Any]) -> dict[str, Range]:
    """The ranges the method declares (`fn.ranges`, or `fn.ranges(settings)`); scaling_coef, when taken and not
    declared: a number or a list of one per task, or 'search'."""
    declared = getattr(fn, "ranges", {})
    ranges = dict(declared(settings) if callable(declared) else declared)
    if "scaling_coef" in inspect.signature(fn).parameters:
        ranges.setdefault("scaling_coef", PER_TASK_COEF)
    return ranges


def range_of(values: Mapping, option: str) -> Range | None:
    """The range declared for `option` (a dotted path) in the resolved config `values`, or None where none is."""
    if option in RUN_OPTIONS:
        return RUN_OPTIONS[option]
    method = values.get("method") if isinstance(values.get("method"), Mapping) else {}
    for prefix in ("method.coefficients.", "coefficients."):
        if option.startswith(prefix):
            block = _at(values, prefix[:-1]) or {}
            return STRATEGY_RANGES.get(block.get("strategy", "grid"), {}).get(option[len(prefix):])
    if option.startswith("method.statistics."):
        return STATISTICS_RANGES.get(option[len("method.statistics."):])
    if option.startswith("method.svc."):
        return SVC_RANGES.get(option[len("method.svc."):])
    if option.startswith("method."):
        fn = method_function(method)
        settings = {k: v for k, v in method.items() if k not in HYDRA_KEYS and k not in PIPELINE_KEYS}
        return method_ranges(fn, settings).get(option[len("method."):])
    return None


def _check_method(method: Mapping, ctx: Context, checked: set[str], relations: bool = True) -> list[str]:
    fn = method_function(method)
    name = getattr(fn, "__name__", str(method.get("_target_")))
    params = inspect.signature(fn).parameters
    settings = {k: v for k, v in method.items() if k not in HYDRA_KEYS and k not in PIPELINE_KEYS}
    ranges = method_ranges(fn, settings)
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes = [p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD][2:]  # after the states
    known = set(takes) | (set(ranges) if open_kwargs else set())
    warnings = []
    for key, value in settings.items():
        if key not in known:
            raise ConfigError(f"method.{key}={shown(value)}: method {name} has no setting {key!r}; its settings are "
                              f"{', '.join(sorted(known)) or 'none'}")
        if key in ranges:
            warnings.append(ranges[key].check(f"method.{key}", value, ctx))
            checked.add(f"method.{key}")
    check_settings = getattr(fn, "check_settings", None)
    if relations and check_settings is not None:
        check_settings(settings, ctx)
    statistics = method.get("statistics")
    if statistics is not None:

        warnings += _check_block("method.statistics", statistics, STATISTICS_RANGES, ctx, checked)
    return warnings


def _check_strategy(prefix: str, block: Mapping, ctx: Context, checked: set[str]) -> list[str]:

    strategy = block.get("strategy", "grid")
    if strategy not in STRATEGY_RANGES:
        raise ConfigError(f"{prefix}.strategy={shown(strategy)}: must be one of "
                          f"{', '.join(map(repr, STRATEGY_RANGES))}")
    checked.add(f"{prefix}.strategy")
    return _check_block(prefix, {k: v for k, v in block.items() if k != "strategy"}, STRATEGY_RANGES[strategy],
                        ctx, checked, f"{prefix}.strategy={strategy}")


def _check_block(prefix: str, block: Any, ranges: Mapping[str, Range], ctx: Context, checked: set[str],
                 owner: str | None = None) -> list[str]:
    if not isinstance(block, Mapping):
        raise ConfigError(f"{prefix}={shown(block)}: must be a block of settings ({', '.join(ranges)})")
    warnings = []
    for key, value in block.items():
        if key not in ranges:
            raise ConfigError(f"{prefix}.{key}={shown(value)}: {owner or prefix} has no setting {key!r}; its settings "
                              f"are {', '.join(sorted(ranges)) or 'none'}")
        warnings.append(ranges[key].check(f"{prefix}.{key}", value, ctx))
        checked.add(f"{prefix}.{key}")
    return warnings


def _at(values: Mapping, path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _leaves(node: Any, prefix: str = ""):
    """(dotted path, value) of every leaf; a list is one leaf (its path), and so are its items (path.i)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
        return
    yield prefix[:-1], node
    if isinstance(node, list):
        for i, v in enumerate(node):
            if not isinstance(v, Mapping | list):
                yield f"{prefix}{i}", v
