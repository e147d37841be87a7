"""The table of merging methods (fusion_bench/merging/registry.py) against everything else that names a method:
conf/method/*.yaml, the function attributes the pipeline reads, the Makefile's method lists, the benchmarks and the
tests' lists; every method merges with its YAML's settings; a new method is two files.
(The affinity each method declares is checked in tests/test_search.py.)"""

from __future__ import annotations

import inspect
import itertools
import json
import re
import sys
import textwrap
from pathlib import Path

import method_cases
import pytest
import torch
from helpers import save_models
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from method_cases import CONF, ROOT, compose_overrides, line_gap, merge, method_config, states
from omegaconf import OmegaConf

import fusion_bench.merging as fm
from fusion_bench.errors import ConfigError
from fusion_bench.evaluation.search import affine_in_coef
from fusion_bench.merging import registry
from fusion_bench.merging.registry import KINDS, STATISTICS, MethodSpec, merging_method, methods
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.stages.merge import Method
from fusion_bench.validation.check import check_options

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(methods())


def config_names(*dirs) -> set[str]:
    return {p.stem for d in dirs for p in (d / "method").glob("*.yaml")}


def check_table_against_configs(*dirs) -> None:
    """One entry per config file and nothing else; each config runs the function its entry declares."""
    table = methods()
    assert set(table) == config_names(*dirs)
    for name, spec in table.items():
        assert isinstance(spec, MethodSpec) and spec.name == name and spec.kind in KINDS, name
        cfg = method_config(name)
        assert get_method(cfg["_target_"]) is spec.function, name
        raw = next(OmegaConf.load(d / "method" / f"{name}.yaml") for d in dirs
                   if (d / "method" / f"{name}.yaml").exists())
        if spec.kind == "coefficients":  # a base config with a coefficient strategy
            assert raw.defaults[0] == spec.base and "_target_" not in raw, name
            assert cfg["coefficients"]["strategy"] == spec.strategy, name
            assert methods()[spec.base].function is spec.function, name
        else:
            assert "coefficients" not in cfg and spec.base is None and spec.strategy is None, name
        if spec.kind == "statistics":
            assert cfg["statistics"]["kind"] == spec.statistic, name
        else:
            assert "statistics" not in cfg and spec.statistic is None, name
        assert ("scaling_coef" in cfg) == spec.takes_coef == (spec.affine is not None), name


def test_the_table_has_one_entry_per_method_config():
    check_table_against_configs(CONF)


def test_statistics_go_to_the_argument_the_statistics_stage_fills():
    from fusion_bench.stages.statistics import KINDS as STAGE_KINDS

    assert STATISTICS == STAGE_KINDS


@pytest.mark.parametrize("name", NAMES)
def test_function_attributes_the_pipeline_reads(name):
    """The decorator keeps the attributes stages/merge.py, evaluation/search.py and export read."""
    spec = methods()[name]
    cfg = OmegaConf.create(method_config(name))
    modes = spec.modes or ("standard", "lora")
    method = Method(cfg, modes[0], name)
    assert method.func is spec.function
    assert method.affine is (spec.affine is not False) and affine_in_coef(method.fn) is method.affine
    assert method.evaluate_linearized is spec.linearized
    assert method.takes_coef is spec.takes_coef
    if spec.modes:
        with pytest.raises(ConfigError, match=f"needs fine-tunes of finetune={spec.modes[0]}"):
            Method(cfg, "standard", name)
    else:
        assert getattr(spec.function, "requires_mode", None) is None


@pytest.mark.parametrize("name", NAMES)
def test_every_method_merges_with_its_settings(tmp_path, name):
    """Plain dicts and LazyStateDicts give the same merge (statistics methods: synthetic statistics); a task-specific
    method gives a TaskSpecificMerge, every other one a state dict of the pretrained keys and dtypes."""
    spec = methods()[name]
    pre, fts = states()
    lpre, lfts = save_models(tmp_path, pre, fts)
    a, b = merge(name, pre, fts), merge(name, lpre, lfts)
    assert isinstance(a, TaskSpecificMerge) == isinstance(b, TaskSpecificMerge) == (spec.kind == "task-specific")
    both = [(a.task_weights(t), b.task_weights(t)) for t in range(len(fts))] if spec.kind == "task-specific" \
        else [(a, b)]
    for sa, sb in both:
        assert list(sa) == list(pre) and list(sb) == list(lpre)
        for k in pre:
            assert sa[k].dtype == pre[k].dtype, (name, k)
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)  # AWD: Gram sums in the files' key order
        assert torch.equal(sa["steps"], pre["steps"])


# ---------------------------------------------------------------------------------------------
# the Makefile's lists
# ---------------------------------------------------------------------------------------------
def makefile() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(variables, recipes): `NAME ?= value` (comments cut) and each target's recipe lines, continuations joined."""
    variables, recipes, target = {}, {}, None
    for line in (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("\t"):
            if target is not None:
                recipes[target].append(line.strip())
            continue
        if m := re.match(r"^([A-Za-z_]\w*)\s*(?:\?=|:=|=)\s*(.*)$", line):
            variables[m[1]] = m[2].split("#")[0].strip()
            target = None
        elif m := re.match(r"^([\w.-]+):(?!=)", line):
            target = m[1]
            recipes[target] = []
    return variables, recipes


def expand(text: str, variables: dict[str, str]) -> str:
    while m := re.search(r"\$\((\w+)\)", text):
        text = text[: m.start()] + variables.get(m[1], "") + text[m.end():]
    return text


def method_args(text: str) -> list[str]:
    """The names of every `method=a,b,c` argument."""
    return [n for group in re.findall(r"(?<![\w.])method=([\w,]+)", text) for n in group.split(",") if n]


def cli_lists(lines: list[str], module: str) -> list[list[str]]:
    """The `--methods a b c` lists of the `-m <module>` commands among `lines`."""
    out = []
    for line in lines:
        words = line.split()
        if f"-m {module} " in f"{line} " and "--methods" in words:
            i = words.index("--methods") + 1
            out.append(list(itertools.takewhile(lambda w: not w.startswith("-"), words[i:])))
    return out


def sweep(target: str, variables, recipes) -> set[str]:
    """Every method a target runs, through the targets it makes ($(MAKE) x)."""
    names = set()
    for line in recipes[target]:
        if m := re.match(r"\$\(MAKE\)\s+([\w-]+)$", line):
            names |= sweep(m[1], variables, recipes)
        names |= set(method_args(expand(line, variables)))
    return names


def test_makefile_method_lists_name_methods_of_the_table():
    variables, recipes = makefile()
    lists = {k: v for k, v in variables.items() if k.startswith("METHODS") or k == "SWEEP"}
    assert {"METHODS", "METHODS_2024", "METHODS_DATA", "SWEEP"} <= set(lists)
    for var, value in lists.items():
        names = expand(value, variables).split(",") if var.startswith("METHODS") else \
            method_args(expand(value, variables))
        assert names and set(names) <= set(methods()), (var, set(names) - set(methods()))
    for target, lines in recipes.items():
        for line in lines:
            line = expand(line, variables)
            assert set(method_args(line)) <= set(methods()), (target, line)


def test_bench_tiny_runs_every_method_of_the_table():
    """bench-tiny says "every method of the table": each method config (an alias: one of its names) is run."""
    variables, recipes = makefile()
    ran = sweep("bench-tiny", variables, recipes)
    same: dict[str, list[str]] = {}  # composed config -> its names (awd = awd_ta)
    for name in methods():
        same.setdefault(json.dumps(method_config(name), sort_keys=True), []).append(name)
    missing = [names for names in same.values() if not set(names) & ran]
    assert not missing, f"bench-tiny does not run {missing}"


def test_makefile_benchmark_lists():
    from fusion_bench.benchmarks import memory
    from fusion_bench.benchmarks.merge import METHODS as BENCH

    variables, recipes = makefile()
    lines = [expand(line, variables) for lines in recipes.values() for line in lines]
    merge_lists = cli_lists(lines, "fusion_bench.benchmarks.merge")
    memory_lists = cli_lists(lines, "fusion_bench.benchmarks.memory")
    assert merge_lists and memory_lists
    for names in merge_lists:
        assert names and set(names) <= set(BENCH), set(names) - set(BENCH)
    for names in memory_lists:
        assert names and set(names) <= set(memory.METHODS)
    assert set(memory.METHODS) <= set(methods())


def test_the_tests_lists_of_the_2024_methods_are_the_makefiles():
    from test_methods_in_modes import METHODS as IN_MODES

    variables, _ = makefile()
    assert set(IN_MODES) == set(expand(variables["METHODS_2024"], variables).split(","))


# ---------------------------------------------------------------------------------------------
# the benchmarks and the pipeline's own lists
# ---------------------------------------------------------------------------------------------
def test_merge_benchmark_runs_every_method_that_merges_without_data():
    from fusion_bench.benchmarks import merge as bench

    rows = bench.methods()
    configs = {config for config, _, _ in rows.values()}
    for name, spec in methods().items():
        plain = spec.kind in bench.BENCH_KINDS and spec.modes is None
        alias = any(method_config(name) == method_config(c) for c in configs if c != name)
        assert (name in configs) == (plain and not alias), name
    for name, (config, fn_name, kwargs) in rows.items():
        fn = methods()[config].function
        assert fn.__name__ == fn_name
        params = inspect.signature(fn).parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        assert open_kwargs or set(kwargs) <= set(params), name
        assert "search" not in kwargs.values(), name
    assert set(bench.DEFAULT_METHODS) == set(rows) - {"wudi_30_steps"}


def test_merge_benchmark_worker_takes_the_function_from_the_table(tmp_path):
    from safetensors.torch import save_file

    from fusion_bench.benchmarks import merge as bench

    pre, fts = states(n=2)
    save_file(pre, tmp_path / "pretrained.safetensors")
    for t, ft in enumerate(fts):
        save_file(ft, tmp_path / f"task{t}.safetensors")
    for method in ("ties", "emr"):
        row = bench.run_one(method, tmp_path, 2, 1, "PASSIVE")
        floats = sum(v.numel() for v in pre.values() if v.is_floating_point())
        assert row["method"] == method and row["n_params"] in (floats, floats + 1)  # a state dict: + "steps"


def test_other_method_lists_name_methods_of_the_table():
    from fusion_bench.benchmarks.gpu import MERGES
    from fusion_bench.stages.coefficients.task_coefs import PER_TASK_METHODS

    for name, (fn_name, _, _) in MERGES.items():
        assert methods()[name].function.__name__ == fn_name, name
    functions = {s.function.__name__ for s in methods().values()}
    assert set(PER_TASK_METHODS) <= functions


# ---------------------------------------------------------------------------------------------
# a new method is two files
# ---------------------------------------------------------------------------------------------
TOY_MODULE = '''
"""Toy methods: the mean task vector, scaled by scaling_coef (and by its square: not affine)."""
from fusion_bench.merging.registry import merging_method
from fusion_bench.merging.task_arithmetic import task_arithmetic


@merging_method(kind="data-free", affine=True)
def toy_mean(pretrained, finetuned, scaling_coef=0.3):
    return task_arithmetic(pretrained, finetuned, scaling_coef=scaling_coef / len(finetuned))


@merging_method("toy_squared", kind="data-free", affine=False)
def toy_mean_squared(pretrained, finetuned, scaling_coef=0.3):
    return toy_mean(pretrained, finetuned, scaling_coef * scaling_coef)
'''
TOY_CONFIGS = {
    "toy_mean": "_target_: fusion_bench.merging.toy_two_files.toy_mean\n_partial_: true\nscaling_coef: search\n",
    "toy_squared": "_target_: fusion_bench.merging.toy_two_files.toy_mean_squared\n_partial_: true\n"
                   "scaling_coef: 0.5\n",
}


def test_a_new_method_is_a_module_and_a_config(tmp_path, monkeypatch, data_dir):
    """fusion_bench/merging/<module>.py with @merging_method and conf/method/<name>.yaml, nothing else: here the
    module lies in a folder added to the package's path and the YAML in a folder added to Hydra's search path."""
    package, conf = tmp_path / "merging", tmp_path / "conf"
    package.mkdir()
    (package / "toy_two_files.py").write_text(textwrap.dedent(TOY_MODULE))
    (conf / "method").mkdir(parents=True)
    for name, text in TOY_CONFIGS.items():
        (conf / "method" / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(fm, "__path__", [*fm.__path__, str(package)])
    monkeypatch.setattr(registry, "_DISCOVERED", False)  # as in a fresh process: the table imports every module
    monkeypatch.setattr(method_cases, "EXTRA_CONF", [str(conf)])
    try:
        table = methods()
        assert "fusion_bench.merging.toy_two_files" in sys.modules  # nothing imported it but the table
        assert table["toy_mean"].kind == "data-free" and table["toy_mean"].affine is True
        assert table["toy_squared"].function.affine_in_scaling_coef is False  # searched by a merge per coefficient
        check_table_against_configs(CONF, conf)
        # it composes, passes the validation and merges as the pipeline runs it
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=compose_overrides(
                f"paths.root={tmp_path}", f"paths.data={data_dir}", "method=toy_mean", "method.scaling_coef=0.6"))
        check_options(cfg)
        pre, fts = states()
        merged = Method(cfg.method, "standard", "toy_mean")(pre, fts, cfg.method.scaling_coef)
        want = {k: v + 0.6 * sum(ft[k] - v for ft in fts) / 3 for k, v in pre.items() if v.is_floating_point()}
        for k, w in want.items():
            torch.testing.assert_close(merged[k], w)
        # the checks of tests/test_search.py tell the affine one from the other
        assert max(line_gap("toy_mean", pre, fts, c) for c in (0.0, 0.3, 1.7)) < 1e-6
        assert line_gap("toy_squared", pre, fts, 1.7) > 1e-4
        assert merge("toy_squared", pre, fts)["ln.weight"].shape == pre["ln.weight"].shape
    finally:
        for name in TOY_CONFIGS:
            registry._TABLE.pop(name, None)
        sys.modules.pop("fusion_bench.merging.toy_two_files", None)
        if hasattr(fm, "toy_two_files"):
            delattr(fm, "toy_two_files")
    assert set(methods()) == config_names(CONF)


def test_declarations_are_checked():
    def coef(pretrained, finetuned, scaling_coef=0.3):
        return pretrained

    def plain(pretrained, finetuned):
        return pretrained

    with pytest.raises(TypeError, match="declare affine=True"):
        merging_method("x_undeclared", kind="data-free")(coef)
    with pytest.raises(TypeError, match="takes no scaling_coef"):
        merging_method("x_plain", kind="data-free", affine=True)(plain)
    with pytest.raises(ValueError, match="kind="):
        merging_method("x_kind", kind="datafree", affine=True)(coef)
    with pytest.raises(ValueError, match="statistic"):
        merging_method("x_stats", kind="statistics")(plain)
    with pytest.raises(TypeError, match="takes 'grams'"):
        merging_method("x_grams", kind="statistics", statistic="gram")(plain)
    with pytest.raises(ValueError, match="declared twice"):
        merging_method("ties", kind="data-free", affine=True)(coef)
    assert not {n for n in methods() if n.startswith("x_")}


def test_the_docs_table_of_methods_is_the_registry_s():
    """docs/methods.md shows the table as the registry gives it (regenerate it with the command written there)."""
    from fusion_bench.merging.registry import markdown

    text = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    shown = text.split("<!-- method-table -->\n")[1].split("<!-- /method-table -->")[0]
    assert shown == markdown()
