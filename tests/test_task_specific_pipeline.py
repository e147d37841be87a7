"""Task-specific merges (TALL masks, EMR) in the pipeline: task t is evaluated with task t's weights, TALL's
lambda_t is chosen per task on val, the report gives each task's storage, stage=merge writes shared + masks."""

import json

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Subset

from fusion_bench.clip.model import ImageClassifier
from fusion_bench.families import build_family
from fusion_bench.merging import emr_merging, tall_masks
from fusion_bench.merging.consensus import tall_mask_lambda_grid
from fusion_bench.pipeline import run
from fusion_bench.stages.coefficients.grid import choose_tall_lambdas
from fusion_bench.stages.evaluate import merged_accuracies
from fusion_bench.stages.merge import Method


def _experiment(make_cfg, *overrides):
    exp = build_family(make_cfg("taskpool.tasks=[shapes,colors,position]", "model.eval_batch_size=32", *overrides))
    for t in exp.tasks:
        exp.tasks[t]._cache["val"] = Subset(exp.tasks[t].split("val"), range(60))
    g = torch.Generator().manual_seed(3)
    fts = [{k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in exp.pretrained_state.items()}
           for _ in exp.tasks]
    return exp, fts


def _by_hand(exp, weights, task):
    """Accuracy of task `task` with the given encoder weights, sample by sample."""
    enc = exp.model_with(weights)
    clf = ImageClassifier(enc, exp.head(task)).eval()
    data = exp.tasks[task].split("val")
    with torch.no_grad():
        return sum(int(clf(x[None]).argmax()) == int(y) for x, y in data) / len(data)


def test_each_task_is_evaluated_with_its_own_weights(make_cfg):
    exp, fts = _experiment(make_cfg)
    ts = emr_merging(exp.pretrained_state, fts)
    got = merged_accuracies(exp, ts, "val")
    for i, t in enumerate(exp.tasks):
        assert got[t] == pytest.approx(_by_hand(exp, ts.task_weights(i), t), abs=1e-6)
    assert got != merged_accuracies(exp, ts.task_weights(0), "val")  # not one model for all


def test_tall_lambda_is_the_best_on_each_tasks_val(make_cfg):
    exp, fts = _experiment(make_cfg, "method=tall_masks")
    chosen = choose_tall_lambdas(exp, Method(exp.cfg.method, exp.mode), fts)
    for i, t in enumerate(exp.tasks):
        curve = [_by_hand(exp, tall_masks(exp.pretrained_state, fts, lambdas=lam).task_weights(i), t)
                 for lam in tall_mask_lambda_grid]
        best = max(curve)
        assert chosen[i] == tall_mask_lambda_grid[curve.index(best)]  # first (smallest) lambda among ties


FAST = ["taskpool.tasks=[colors,position]", "model.train.steps=12", "model.train.warmup_steps=2",
        "model.train.batch_size=32"]


@pytest.mark.slow
def test_tall_masks_end_to_end_report_and_file(make_cfg, tmp_path):
    report = run(make_cfg(*FAST, "method=tall_masks"), tmp_path / "tall", "tall_masks")
    assert len(report["chosen_on_val"]["lambdas"]) == 2
    assert set(report["chosen_on_val"]["lambdas"]) <= set(tall_mask_lambda_grid)
    assert report["storage"]["task_bits_per_parameter"] == [1.0, 1.0]
    assert all(0 <= r["merged"] <= 1 for r in report["tasks"].values())
    run(make_cfg(*FAST, "method=emr", "stage=merge"), tmp_path / "emr", "emr")
    with safe_open(str(tmp_path / "emr" / "task_specific.safetensors"), "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["tasks"]) == ["colors", "position"] and len(json.loads(meta["rescalers"])) == 2
        masks = [k for k in f.keys() if k.startswith("masks.")]  # noqa: SIM118
        assert masks and f.get_tensor(masks[0]).dtype == torch.uint8 and f.get_tensor(masks[0]).shape[0] == 2  # packed
    assert (tmp_path / "tall" / "task_specific.safetensors").is_file()  # stage=all writes it too
