"""The coefficient search reads each val batch once for all 21 coefficients (one jvp for linearized models) and
gives exactly the accuracies of 21 separate merges and evaluations."""

import pytest
import torch
from torch.utils.data import Subset

from fusion_bench import merging
from fusion_bench.evaluation.search import GRID
from fusion_bench.families import build_family
from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies
from fusion_bench.stages.merge import Method

SCALED = {  # every library method with a scaling_coef, with hyper-parameters where they differ from TA
    "task_arithmetic": {}, "ties_merging": {"k": 0.3}, "dare": {"p": 0.5}, "awd_ta": {}, "awd_ties": {"k": 0.3},
}


def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g), "step": torch.tensor(3)}
    fts = [{k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in pre.items()}
           for _ in range(n)]
    return pre, fts


@pytest.mark.parametrize("name", sorted(SCALED))
def test_every_scaled_method_is_affine_in_its_coefficient(name):
    """The search's premise: theta(c) = theta_0 + c * (theta(1) - theta_0)."""
    fn = getattr(merging, name)
    pre, fts = _states()
    one = fn(pre, fts, scaling_coef=1.0, **SCALED[name])
    for c in (0.0, 0.35, 0.8):
        got = fn(pre, fts, scaling_coef=c, **SCALED[name])
        for k in ("w", "b"):
            torch.testing.assert_close(got[k], pre[k] + c * (one[k] - pre[k]), rtol=1e-5, atol=1e-6)


def _experiment(make_cfg, *overrides, sizes=(("shapes", 90), ("colors", 70))):
    cfg = make_cfg(f"taskpool.tasks=[{','.join(t for t, _ in sizes)}]", "model.eval_batch_size=32", *overrides)
    exp = build_family(cfg)
    for t, n in sizes:  # odd sizes: a last partial batch
        exp.tasks[t]._cache["val"] = Subset(exp.tasks[t].split("val"), range(n))
    return exp, Method(cfg.method, exp.mode)


def _fake_finetunes(exp, scale):
    """Task vectors without training: the pretrained merge-space point plus seeded noise."""
    g = torch.Generator().manual_seed(1)
    pre = exp.pretrained_state
    return [{k: v + scale * v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g) for k, v in pre.items()}
            for _ in range(2)]  # (LoRA's B starts at 0: std 0)


class _Counted(torch.utils.data.Dataset):
    def __init__(self, data, name, reads):
        self.data, self.name, self.reads = data, name, reads

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads.append((self.name, i))
        return self.data[i]


@pytest.mark.parametrize("overrides,scale", [
    ((), 0.3),
    (("finetune=attention",), 0.3),
    (("finetune=lora",), 0.3),
    (("finetune=lora", "finetune.task_vector=adapters"), 1.0),
    (("finetune=l_lora",), 1.0),  # folded adapters: not affine in c after folding, each c reloaded
    (("finetune=linear",), 0.3),  # one jvp per batch
    (("finetune=l_lora", "method=partial_linearization"), 1.0),  # linearized adapters: one jvp per batch
    (("method=ties", "method.k=0.3"), 0.3),
], ids=["standard", "attention", "lora", "lora-adapters", "l_lora", "linear-jvp", "partial_lin-jvp", "ties"])
def test_grid_equals_separate_merges_and_evaluations(make_cfg, overrides, scale):
    exp, method = _experiment(make_cfg, *overrides)
    fts = _fake_finetunes(exp, scale)
    lin = method.evaluate_linearized
    separate = [merged_accuracies(exp, method(exp.pretrained_state, fts, c), "val", linearized=lin) for c in GRID]
    reads = []
    for t in exp.tasks:  # count how often each val sample is read
        exp.tasks[t]._cache["val"] = _Counted(exp.tasks[t]._cache["val"], t, reads)
    grid = grid_accuracies(exp, method, fts, GRID, "val")
    assert len(reads) == len(set(reads)) == 160  # every val sample decoded once for all 21 coefficients
    assert len({round(a["shapes"], 6) for a in separate}) > 3  # the curve is not flat: a real comparison
    for c, a, b in zip(GRID, grid, separate, strict=True):
        for t in exp.tasks:
            assert a[t] == pytest.approx(b[t], abs=1.5 / 90), (c, t)  # float round-off may flip one sample
    assert sum(abs(a[t] - b[t]) > 1e-6 for a, b in zip(grid, separate) for t in exp.tasks) <= 2


def test_search_holds_one_evaluation_encoder(make_cfg):
    """The grid writes each coefficient's weights into one encoder in place: no copy per coefficient."""
    import gc

    from fusion_bench.models import clip

    exp, method = _experiment(make_cfg)
    fts = _fake_finetunes(exp, 0.3)
    made = []
    real = clip.ImageClassifier.__init__
    clip.ImageClassifier.__init__ = lambda self, *a, **k: made.append(1) or real(self, *a, **k)
    try:
        gc.collect()
        grid_accuracies(exp, method, fts, GRID, "val")
    finally:
        clip.ImageClassifier.__init__ = real
    assert made == []  # the grid never builds a classifier per coefficient (or at all)


DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]


def test_ddp_search_in_one_start_of_the_ranks(make_cfg, monkeypatch, tmp_path):
    import lightning as L

    exp, method = _experiment(make_cfg, *DDP, f"paths.store={tmp_path / 'ddp'}")
    single, _ = _experiment(make_cfg)
    fts = _fake_finetunes(single, 0.3)
    starts, test = [], L.Trainer.test
    monkeypatch.setattr(L.Trainer, "test", lambda self, *a, **k: starts.append(1) or test(self, *a, **k))
    ddp, one = grid_accuracies(exp, method, fts, GRID, "val"), grid_accuracies(single, method, fts, GRID, "val")
    assert len(starts) == 1
    for a, b in zip(ddp, one, strict=True):
        assert a == pytest.approx(b, abs=1e-6)  # the same counts (torchmetrics divides in float32)


def test_non_affine_method_is_searched_by_merging_at_each_coefficient(make_cfg):
    calls = []

    def squared(pretrained, finetuned, scaling_coef=0.3):
        calls.append(scaling_coef)
        return merging.task_arithmetic(pretrained, finetuned, scaling_coef=scaling_coef ** 2)

    squared.affine_in_scaling_coef = False
    exp, method = _experiment(make_cfg)
    method.fn = method.func = squared
    fts = _fake_finetunes(exp, 0.3)
    got = grid_accuracies(exp, method, fts, [0.0, 0.5, 1.0], "val")
    assert calls == [0.0, 0.5, 1.0]
    assert got[1] == merged_accuracies(exp, merging.task_arithmetic(exp.pretrained_state, fts, 0.25), "val")


def test_normalized_mean_leaves_out_a_task_whose_fine_tune_scores_zero(caplog):
    from fusion_bench.evaluation.search import normalized_mean

    ref = {"a": {"finetuned_val": 0.5}, "b": {"finetuned_val": 0.8}, "c": {"finetuned_val": 0.0}}
    with caplog.at_level("WARNING"):
        assert normalized_mean({"a": 0.25, "b": 0.4, "c": 0.3}, ref, "val") == pytest.approx((0.5 + 0.5) / 2)
    assert "leaves out ['c']" in caplog.text
    assert normalized_mean({"a": 0.5, "b": 0.8}, ref, "val") == pytest.approx(1.0)
    assert normalized_mean({"c": 0.3}, ref, "val") == pytest.approx(0.3)  # nothing to normalize by: plain mean
