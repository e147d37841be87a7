"""hparams_search=optuna*: per-task coefficients (method.task_coefs), the trial objective on val, and a real
Optuna multirun on two tiny tasks where only the best trial is evaluated on test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fusion_bench.merging import task_arithmetic
from fusion_bench.pipeline import validate_config
from fusion_bench.stages.coefficients import task_coefs
from fusion_bench.stages.merge import Method

ROOT = Path(__file__).resolve().parent.parent
TWO = "taskpool.tasks=[digits,shapes]"


def test_task_coefs_are_checked_before_training(make_cfg):
    ok = make_cfg(TWO, "++method.task_coefs={shapes:0.7,digits:0.2}")
    assert task_coefs.task_weights(ok.method, ok.taskpool.tasks) == [0.2, 0.7]  # taskpool.tasks order
    as_list = make_cfg(TWO, "++method.task_coefs=[0.2,0.7]")
    assert task_coefs.task_weights(as_list.method, ["digits", "shapes"]) == [0.2, 0.7]
    bad = {
        "++method.task_coefs={digits:0.2}": r"missing \['shapes'\], not in the pool \[\]",
        "++method.task_coefs={digits:0.2,shapes:0.1,colors:0.3}": r"not in the pool \['colors'\]",
        "++method.task_coefs=[0.2,0.7,0.1]": r"3 values for the 2 tasks",
        "++method.task_coefs={digits:0.2,shapes:high}": r"must be numbers, got \{'shapes': 'high'\}",
    }
    for override, message in bad.items():
        with pytest.raises(ValueError, match=message):
            validate_config(make_cfg(TWO, override))
    with pytest.raises(TypeError, match=r"method.task_coefs=0.3: expected task -> coefficient"):
        validate_config(make_cfg(TWO, "++method.task_coefs=0.3"))
    with pytest.raises(ValueError, match="ties_merging takes one scaling_coef for all tasks"):
        validate_config(make_cfg(TWO, "method=ties", "++method.task_coefs={digits:0.2,shapes:0.7}"))
    with pytest.raises(ValueError, match="dare takes one scaling_coef"):
        validate_config(make_cfg(TWO, "method=dare_ties", "++method.task_coefs={digits:0.2,shapes:0.7}"))
    with pytest.raises(ValueError, match="both give per-task coefficients"):
        validate_config(make_cfg(TWO, "method.scaling_coef=[0.1,0.2]",
                              "++method.task_coefs={digits:0.2,shapes:0.7}"))
    with pytest.raises(ValueError, match="coefficients=adamerging: that strategy learns"):
        validate_config(make_cfg(TWO, "coefficients=adamerging", "++method.task_coefs={digits:0.2,shapes:0.7}"))
    with pytest.raises(ValueError, match=r"objective='val': expected one of \('val_normalized',\)"):
        validate_config(make_cfg(TWO, "objective=val"))
    with pytest.raises(ValueError, match="needs stage=all or stage=evaluate, not stage=merge"):
        validate_config(make_cfg(TWO, "objective=val_normalized", "stage=merge"))


def test_task_coefs_weight_each_task_vector(make_cfg):
    """task t gets scaling_coef * task_coefs[t]: the same merge as task arithmetic with that list."""
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    for method_name in ("task_arithmetic", "awd_ta", "dare"):
        cfg = make_cfg(TWO, f"method={method_name}", "++method.task_coefs={digits:0.2,shapes:0.7}")
        method = Method(cfg.method, "standard")  # task_coefs is the pipeline's, not the merging function's
        method.task_weights = task_coefs.task_weights(cfg.method, cfg.taskpool.tasks)
        plain = Method(make_cfg(TWO, f"method={method_name}").method, "standard")
        got, want = method(pre, fts, 0.5), plain(pre, fts, [0.1, 0.35])
        assert all(torch.equal(got[k], want[k]) for k in pre), method_name
    ta = task_arithmetic(pre, fts, [0.1, 0.35])
    tau = [ft["w"] - pre["w"] for ft in fts]
    assert torch.allclose(ta["w"], pre["w"] + 0.1 * tau[0] + 0.35 * tau[1])


def test_the_search_space_samples_one_coefficient_per_task(make_cfg):
    import optuna

    from fusion_bench.hparams.space import task_coefs as space

    cfg = make_cfg("hparams_search=optuna_task_coefs", "taskpool.tasks=[digits,shapes,colors]",
                   "task_coefs_space.low=0.25", "task_coefs_space.high=0.5")
    assert cfg.objective == "val_normalized" and cfg.method.scaling_coef == 1.0
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        space(cfg, trial)
        assert list(trial.params) == [f"++method.task_coefs.{t}" for t in ("digits", "shapes", "colors")]
        assert all(0.25 <= v <= 0.5 for v in trial.params.values())
    with pytest.raises(ValueError, match="low=0.5 must be below high=0.5"):
        space(make_cfg("hparams_search=optuna_task_coefs", "task_coefs_space.low=0.5",
                       "task_coefs_space.high=0.5"), study.ask())


@pytest.mark.slow
def test_optuna_sweep_tests_only_the_best_trial(tmp_path, data_dir):
    cmd = [sys.executable, "run.py", "hparams_search=optuna_task_coefs", "taskpool.tasks=[digits,textures]",
           "model.train.steps=15", "model.train.warmup_steps=3", "model.train.batch_size=32",
           "model.train.checkpoint_every=10", "hydra.sweeper.n_trials=3", f"paths.root={tmp_path}",
           f"paths.data={data_dir}"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")

    trials = {int(d.name): json.loads((d / "trial.json").read_text())
              for d in sorted(sweep.iterdir(), key=lambda d: d.name) if d.name.isdigit()}
    assert sorted(trials) == [0, 1, 2]
    for n, trial in trials.items():
        coefs = yaml.safe_load((sweep / str(n) / ".hydra" / "overrides.yaml").read_text())
        sampled = {o.split("=")[0].rsplit(".", 1)[1]: float(o.split("=")[1])
                   for o in coefs if o.startswith("++")}
        assert trial["task_coefs"] == sampled and all(0.0 <= v <= 1.0 for v in sampled.values())
        # the returned objective is the mean normalized val accuracy; a trial holds val figures only
        assert trial["value"] == pytest.approx(sum(t["normalized_val"] for t in trial["tasks"].values()) / 2)
        assert all(set(t) == {"merged_val", "finetuned_val", "zeroshot_val", "normalized_val"}
                   for t in trial["tasks"].values())
        assert not list((sweep / str(n)).glob("report*.json")) and not list((sweep / str(n)).glob("merged*"))

    best = json.loads((sweep / "optuna_best.json").read_text())
    values = [trials[n]["value"] for n in sorted(trials)]
    assert best["value"] == max(values) and best["best_trial"] == values.index(max(values))
    optuna_results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optuna_results["best_value"] == best["value"]  # what Optuna got back from the task function
    assert best["optuna_params"] == {f"++method.task_coefs.{t}": v
                                     for t, v in trials[best["best_trial"]]["task_coefs"].items()}
    # test figures: the best trial's, once, in best/report.json (the ordinary report), and nowhere else
    report = json.loads((sweep / best["report"]).read_text())
    assert best["report"] == "best/report.json" and report["tasks"] == best["test"]
    assert report["method_config"]["task_coefs"] == trials[best["best_trial"]]["task_coefs"]
    assert all(0.0 <= v["merged"] <= 1.0 for v in report["tasks"].values())
    assert [p.relative_to(sweep).as_posix() for p in sweep.rglob("report*.json")] == ["best/report.json"]
    summary = (sweep / "summary.md").read_text().splitlines()
    assert len(summary) == 3 and "best/report.json" in summary[2]
    assert "Test figures are for this trial only" in (sweep / "optuna_best.md").read_text()
