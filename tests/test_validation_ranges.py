"""The validation pass (fusion_bench/validation) over the real configs: every option of every config group composes
and validates; every numeric option has a declared range, and the usual bad values (nan, inf, 0, negative, huge,
a fraction where an integer is due, a word) are either inside that range or refused with a ConfigError naming the
option, by the pass alone (nothing is loaded or trained)."""

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fusion_bench.errors import ConfigError
from fusion_bench.pipeline import validate_config
from fusion_bench.validation.check import check_options, range_of
from fusion_bench.validation.ranges import Context

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "taskpool", "finetune", "coefficients", "method", "trainer", "analysis")
# what a group option needs beside it to be a valid run (anything not named: the defaults of conf/config.yaml)
NEEDS = {
    ("model", "flan_t5_base"): ["taskpool=glue"],
    ("model", "flan_t5_large"): ["taskpool=glue"],
    ("model", "tiny_t5"): ["taskpool=glue"],
    ("taskpool", "glue"): ["model=tiny_t5"],
    ("taskpool", "tiny_glue"): ["model=tiny_t5"],
    ("method", "partial_linearization"): ["finetune=l_lora"],
    ("method", "lorahub"): ["finetune=l_lora"],
    ("coefficients", "lorahub"): ["finetune=l_lora"],
}
BAD = [math.nan, math.inf, -math.inf, 0, -1, -5, 1e12, 2.5, "abc"]
ALWAYS_REFUSED = [math.nan, math.inf, -math.inf, "abc"]  # for any number; "abc" is no alternative spelled in conf/
COEFFICIENT_OPTIONS = ("method.scaling_coef", "method.lambdas", "analysis.scaling_coef")  # may default to 'search'


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def _overrides(group: str, option: str) -> list[str]:
    extra = ["stage=analyze"] if group == "analysis" else []
    return [f"{group}={option}", *NEEDS.get((group, option), []), *extra]


@functools.cache
def _composed(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/val_work/ranges", *overrides])


def _compose(*overrides: str):
    return copy.deepcopy(_composed(overrides))


@pytest.fixture(autouse=True)
def _cuda_for_gpu_trainers(monkeypatch):
    """trainer=gpu / ddp and the paper experiments are valid configs on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda x: x)
def test_every_group_option_composes_and_validates(group, option):
    validate_config(_compose(*_overrides(group, option)))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_validates(name):
    validate_config(_compose(f"experiment={name}"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_every_hparams_search_validates(name):
    validate_config(_compose(f"hparams_search={name}"))


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _walk_cases() -> list[tuple[tuple[str, ...], str]]:
    """(overrides, option) for every numeric option of every group option (each option path once per group
    option), the top-level numbers of conf/config.yaml and the coefficient options that default to 'search'."""
    cases = []
    configs = [(g, o, _overrides(g, o)) for g, o in _options()]
    configs += [("", "config", []), ("task_coefs_space", "optuna_task_coefs", ["hparams_search=optuna_task_coefs"])]
    for group, _, overrides in configs:
        values = OmegaConf.to_container(_compose(*overrides), resolve=True)
        for option, value in _leaves(values):
            top = option.split(".")[0]
            mine = option.startswith(f"{group}.") if group else top not in GROUPS and top != "task_coefs_space"
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if mine and (numeric or option in COEFFICIENT_OPTIONS):
                cases.append((tuple(overrides), option))
    return cases


WALK = _walk_cases()


def test_the_walk_covers_the_config_groups():
    options = {option for _, option in WALK}
    for must in ("seed", "num_threads", "model.train.steps", "model.train.lr", "model.train.batch_size",
                 "model.eval_batch_size", "taskpool.val_fraction", "method.scaling_coef", "method.p", "method.k",
                 "method.density", "method.lambdas", "coefficients.steps", "method.coefficients.lr",
                 "method.statistics.num_samples", "finetune.r", "analysis.grid_points", "task_coefs_space.high",
                 "trainer.devices"):
        assert must in options, must
    assert len(WALK) > 150


@pytest.mark.parametrize(("overrides", "option"), WALK, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_numeric_option_has_a_range_and_refuses_bad_values_by_name(overrides, option):
    cfg = _compose(*overrides)
    values = OmegaConf.to_container(cfg, resolve=True)
    rng = range_of(values, option)
    assert rng is not None, f"{option} has no declared range (fusion_bench/validation/options.py, or the method's)"
    assert check_options(cfg) is not None  # the config as composed is valid
    ctx = Context(tasks=tuple(values["taskpool"]["tasks"]))
    for bad in BAD:
        changed = copy.deepcopy(cfg)
        OmegaConf.update(changed, option, bad, merge=False)
        try:
            check_options(changed)
        except ConfigError as e:
            assert f"{option}=" in str(e), f"{option}={bad!r} refused without naming it: {e}"
            assert "\n" not in str(e)
            continue
        assert bad not in ALWAYS_REFUSED and not (isinstance(bad, float) and math.isnan(bad)), \
            f"{option}={bad!r} accepted"
        assert rng.problem(bad, ctx) is None, f"{option}={bad!r} accepted outside its range {rng.describe(ctx)}"


def _accepted(option: str, value, *overrides: str) -> bool:
    cfg = _compose(*overrides)
    OmegaConf.update(cfg, option, value, merge=False)
    try:
        check_options(cfg)
    except ConfigError as e:
        assert str(e).startswith(f"{option}="), e
        return False
    return True


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# The documented ranges (README "Bad input"), written out here independently of the code that checks them.
DOCUMENTED = {
    "model.train.steps": ((), lambda x: _is_int(x) and x >= 1),
    "model.train.batch_size": ((), lambda x: _is_int(x) and x >= 1),
    "model.train.lr": ((), lambda x: math.isfinite(x) and x > 0),
    "model.train.warmup_steps": ((), lambda x: _is_int(x) and x >= 0),
    "seed": ((), lambda x: _is_int(x) and 0 <= x < 2**32),
    "taskpool.val_fraction": (("taskpool=eight_tasks",), lambda x: math.isfinite(x) and 0 < x < 1),
    "method.scaling_coef": ((), lambda x: math.isfinite(x) and abs(x) <= 1000),
    "method.p": (("method=dare",), lambda x: math.isfinite(x) and 0 <= x < 1),
    "method.k": (("method=ties",), lambda x: math.isfinite(x) and 0 < x <= 1),
    "coefficients.lr": (("coefficients=adamerging",), lambda x: math.isfinite(x) and x > 0),
}
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40),
                    st.sampled_from([0, 1, -1, 0.0, 1.0, 0.5, 1e-12, 2**32 - 1, 2**32, 1000, 1000.5]))


@pytest.mark.parametrize("option", sorted(DOCUMENTED))
@settings(max_examples=40, deadline=None)
@given(value=NUMBERS)
def test_a_number_is_accepted_exactly_inside_its_documented_range(option, value):
    overrides, inside = DOCUMENTED[option]
    assert _accepted(option, value, *overrides) == inside(value)


def test_scaling_coef_forms_kept_and_warned_beyond_ten():
    two = ("taskpool.tasks=[digits,shapes]",)
    assert _accepted("method.scaling_coef", "search", *two)
    assert _accepted("method.scaling_coef", [0.3, -1.0], *two)  # one per task; negative = negation
    assert not _accepted("method.scaling_coef", [0.3, 0.3, 0.3], *two)
    assert not _accepted("method.scaling_coef", [0.3, math.nan], *two)
    assert not _accepted("method.scaling_coef", [0.3, 0.3], *two, "method=ties")  # TIES takes one number
    cfg = _compose(*two, "method.scaling_coef=20")
    (warning,) = check_options(cfg)
    assert warning.startswith("method.scaling_coef=20: |coefficient| > 10")
    assert check_options(_compose(*two, "method.scaling_coef=-1")) == []
