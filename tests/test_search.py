"""The coefficient search reads each val batch once for all 21 coefficients (one jvp for linearized models) and
gives exactly the accuracies of 21 separate merges and evaluations."""

import pytest
import torch
from method_cases import line_gap, moved, settings, states
from torch.utils.data import Subset

from fusion_bench import merging
from fusion_bench.evaluation.search import GRID, affine_in_coef
from fusion_bench.families import build_family
from fusion_bench.merging.registry import methods
from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies
from fusion_bench.stages.merge import Method
from fusion_bench.validation.check import method_ranges
from fusion_bench.validation.ranges import PER_TASK_COEF

AFFINE = sorted(n for n, s in methods().items() if s.affine)  # every method declared affine in its scaling_coef
NOT_AFFINE = sorted(n for n, s in methods().items() if s.affine is False)
AWD = {"lr": 100.0}  # the YAML's lr barely moves delta on these small task vectors; this moves it by 0.3 ||tau||
OVER = {n: AWD for n in AFFINE if methods()[n].function.__name__.startswith("awd")}
OTHER_PATHS = [  # settings that take another code path than the YAML's
    ("ties", {"per_tensor": True}), ("dare_ties", {"k": 0.5}), ("dare_ties", {"k": 0.5, "per_tensor": True}),
    ("dare", {"rescale": False}), ("awd_ta", {"optimizer": "adam", "lr": 1.0}), ("awd_ties", {**AWD, "k": 1.0}),
    ("awd_ties", {**AWD, "per_tensor": True}), ("awd_ties", {"optimizer": "adam", "lr": 1.0}),
    ("consensus_ties", {"ties_agg": "mean"}), ("consensus_ta", {"lambdas": [0.2, 0.4, 0.6], "k": 1}),
    ("wudi", {"keys": "all_2d", "lr": 1e-2}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("iso_cts", {"common_space_fraction": 0.5}),
]
CASES = [(n, OVER.get(n, {})) for n in AFFINE] + OTHER_PATHS
PER_TASK = [n for n in AFFINE  # scaling_coef takes one per task (method.task_coefs: scaling_coef * task_coefs[t])
            if method_ranges(methods()[n].function, settings(n)).get("scaling_coef") is PER_TASK_COEF]


@pytest.mark.parametrize(("name", "over"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_scaled_method_is_affine_in_its_coefficient(name, over):
    """The search's premise, for every method of the table that says affine=True, with its YAML's settings (and
    other code paths): theta(c) = theta_0 + c * (theta(1) - theta_0), also at c = 0 and past 1."""
    assert methods()[name].affine
    pre, fts = states()
    assert moved(name, pre, fts, **over)  # theta(1) != theta_0: the check below is not about theta_0 alone
    for c in (0.0, 0.3, 1.7):
        assert line_gap(name, pre, fts, c, **over) < 1e-6, c


@pytest.mark.parametrize("name", PER_TASK)
def test_per_task_coefficients_scale_along_one_line(name):
    """method.task_coefs with scaling_coef=search: the search merges once at scaling_coef = w (one per task) and
    reads theta_0 + c * (theta(w) - theta_0) as the merge at c * w."""
    pre, fts = states()
    for c in (0.0, 0.3, 1.7):
        assert line_gap(name, pre, fts, c, at_one=[0.5, 1.0, 1.5], **OVER.get(name, {})) < 1e-6, c


@pytest.mark.parametrize("name", NOT_AFFINE)
def test_methods_declared_not_affine_are_not(name):
    """affine=False costs one merge per coefficient of the grid: a method that says so must need it."""
    pre, fts = states()
    assert max(line_gap(name, pre, fts, c) for c in (0.3, 1.7)) > 1e-4


def test_methods_without_a_coefficient_declare_no_affinity():
    for name, spec in methods().items():
        assert (spec.affine is None) == (not spec.takes_coef), name
        assert affine_in_coef(spec.function) is (spec.affine is not False), name  # what the search reads


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

    from fusion_bench.clip import model as clip

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
