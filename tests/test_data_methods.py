"""Methods that look at data, in the pipeline: per-task statistics made once and kept in the store (RegMean's Grams,
Fisher), coefficients learnt from data (AdaMerging, LoraHub), and bad input stopped before any work. Fine-tunes are
fake (seeded noise written into the store), so nothing trains."""

import pytest
import torch
from safetensors.torch import load_file

from fusion_bench import merging
from fusion_bench.families import build_family
from fusion_bench.pipeline import run
from fusion_bench.stages import statistics
from fusion_bench.stages.evaluate import merged_accuracies
from fusion_bench.stages.merge import Method
from fusion_bench.statistics import diagonal_fisher, input_grams

TASKS = ["shapes", "colors"]
POOL = [f"taskpool.tasks=[{','.join(TASKS)}]", "model.eval_batch_size=64"]


def _store_fake_finetunes(make_cfg, *overrides, scale=0.3):
    """Fine-tunes as the store would hold them (trainable state + this run's fingerprint), without training."""
    fam = build_family(make_cfg(*POOL, *overrides))
    g = torch.Generator().manual_seed(5)
    fts = []
    for t in TASKS:
        state = {k: v + scale * v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g)
                 for k, v in fam.trainable_state(fam.base).items()}
        fam.store.save(fam.checkpoint(t), state, {"task": t, "pretrained": fam.fingerprint})
        fts.append(fam.to_merge_space(state))
    return fam, fts


def _no_training(monkeypatch):
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))


def test_grams_stored_once_keyed_and_equal_to_a_direct_pass(make_cfg, monkeypatch):
    fam, fts = _store_fake_finetunes(make_cfg)
    method = Method(make_cfg("method=regmean", "method.statistics.num_samples=40").method, "standard")
    grams = statistics.task_statistics(fam, method, TASKS)["grams"]
    spec = statistics.spec(method)
    for t, ft, g in zip(TASKS, fts, grams):
        assert statistics.path(fam, t, spec).is_file()
        direct, n = input_grams(fam.model_with(ft), fam.batches(t, "train", 40, 0, 16), forward=lambda m, b: m(b[0]),
                                size=lambda b: len(b[0]))
        assert n == 40 and set(g) == set(direct) & set(fam.pretrained_state)
        for k in g:
            torch.testing.assert_close(g[k], direct[k], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(type(fam), "grams", lambda *a: pytest.fail("recomputed a stored statistic"))
    again = statistics.task_statistics(fam, method, TASKS)["grams"]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again, grams) for k in a)
    other = Method(make_cfg("method=regmean", "method.statistics.num_samples=20").method, "standard")
    assert statistics.path(fam, "shapes", statistics.spec(other)) != statistics.path(fam, "shapes", spec)
    # Grams of another definition (version 1: per sample, padding counted) live under another key: never reused
    current = statistics.path(fam, "shapes", spec)
    monkeypatch.setattr(statistics, "GRAMS_VERSION", 1)
    assert statistics.path(fam, "shapes", spec) != current


@pytest.mark.parametrize("name,target", [("regmean", None), ("fisher_merging", "sample"),
                                         ("fisher_merging", "expected")])
def test_stage_merge_equals_the_function_over_the_statistics(make_cfg, tmp_path, monkeypatch, name, target):
    fam, fts = _store_fake_finetunes(make_cfg)
    _no_training(monkeypatch)
    cfg = make_cfg(*POOL, f"method={name}", "method.statistics.num_samples=24", "stage=merge",
                   *([f"method.statistics.target={target}"] if target else []))
    run(cfg, tmp_path / "m", name)
    merged = load_file(tmp_path / "m" / "merged.safetensors")
    batches = {t: fam.batches(t, "train", 24, 0, 16) for t in TASKS}
    if name == "regmean":
        stats = [input_grams(fam.model_with(ft), batches[t], forward=lambda m, b: m(b[0]),
                             size=lambda b: len(b[0]))[0] for t, ft in zip(TASKS, fts)]
        expected = merging.regmean(fam.pretrained_state, fts, stats, reduce_non_diagonal_ratio=0.9)
    else:
        stats = []
        for t, ft in zip(TASKS, fts):
            clf = fam.classifier(fam.model_with(ft), t)
            f, _ = diagonal_fisher(clf, batches[t], keys=[f"encoder.{k}" for k in fam.pretrained_state], seed=0,
                                   target=target)
            stats.append({k.removeprefix("encoder."): v for k, v in f.items()})
        expected = merging.fisher_merging(fam.pretrained_state, fts, stats)
    assert set(merged) == set(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(merged[k], merging.weight_average(fam.pretrained_state, fts)[k]) for k in merged)


def test_adamerging_starts_at_task_arithmetic_and_learns(make_cfg, tmp_path, monkeypatch):
    _store_fake_finetunes(make_cfg)
    _no_training(monkeypatch)
    base = [*POOL, "stage=evaluate"]
    ta = run(make_cfg(*base, "method.scaling_coef=0.3"), tmp_path / "ta", "task_arithmetic")
    zero = run(make_cfg(*base, "method=adamerging", "method.coefficients.steps=0"), tmp_path / "a0", "adamerging")
    assert zero["tasks"] == ta["tasks"]  # every coefficient at its start, 0.3: task arithmetic at 0.3
    ada = run(make_cfg(*base, "method=adamerging", "method.coefficients.steps=3"), tmp_path / "a3", "adamerging")
    learnt = ada["learnt_coefficients"]
    assert ada["scaling_coef"] == "adamerging" and learnt["inputs"] == "test split, no labels"
    assert set(learnt["coefficients"]) == set(TASKS) and len(learnt["coefficients"]["shapes"]) == len(learnt["keys"])
    assert learnt["entropy_last"] < learnt["entropy_first"]
    assert any(abs(c - 0.3) > 1e-4 for cs in learnt["coefficients"].values() for c in cs)
    assert (tmp_path / "a3" / "coefficients.png").is_file()
    # task-wise over TIES-trimmed task vectors (AdaMerging++): one coefficient per task
    pp = run(make_cfg(*base, "method=adamerging_pp", "method.coefficients.steps=2",
                      "method.coefficients.layer_wise=false"), tmp_path / "pp", "adamerging_pp")
    assert all(isinstance(c, float) for c in pp["learnt_coefficients"]["coefficients"].values())


def test_lorahub_merges_the_adapters_at_the_weights_it_reports(make_cfg, tmp_path, monkeypatch):
    fam, fts = _store_fake_finetunes(make_cfg, "finetune=l_lora", scale=1.0)
    _no_training(monkeypatch)
    hub = run(make_cfg(*POOL, "finetune=l_lora", "method=lorahub", "method.coefficients.budget=5", "stage=evaluate"),
              tmp_path / "hub", "lorahub")
    w = [hub["learnt_coefficients"]["weights"][t] for t in TASKS]
    assert all(-1.5 <= x <= 1.5 for x in w)
    # l_lora's default init is compensated: combined around phi_0 (w = 0 is the pretrained model), not around 0
    origin = merging.lorahub.lorahub_origin(fam.pretrained_state)
    assert origin is not None and hub["learnt_coefficients"]["origin"] == "phi_0 (the adapters' init)"
    expected = merged_accuracies(fam, merging.lorahub.combine_adapters(fts, w, origin), "test")
    assert {t: hub["tasks"][t]["merged"] for t in TASKS} == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("overrides,match", [
    (["method=regmean", "finetune=linear"], "method=regmean needs input Gram matrices.*linearized model"),
    (["method=fisher_merging", "finetune=l_lora"], "method=fisher_merging needs the Fisher.*LoRA adapters"),
    (["method=tsv_merging", "coefficients=adamerging"], "not of method=tsv_merging"),
    (["method=lorahub"], "combines LoRA adapters: use finetune=l_lora"),
    (["method=regmean", "coefficients=lorahub"], "method=regmean weighs by statistics"),
    (["method=adamerging", "coefficients=lorahub"], "give one"),
])
def test_bad_input_stops_before_any_training(make_cfg, tmp_path, monkeypatch, overrides, match):
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=match):
        run(make_cfg(*POOL, *overrides, f"paths.store={tmp_path}/empty"), tmp_path / "r", overrides[0][7:])


def test_a_task_without_a_train_split_is_named(make_cfg, tmp_path, monkeypatch):
    from fusion_bench.data.tasks import Task

    _no_training(monkeypatch)
    real = Task.split

    def split(self, name):
        if name == "train" and self.name == "colors":
            raise FileNotFoundError("no train/ folder under /data/colors")
        return real(self, name)

    monkeypatch.setattr(Task, "split", split)
    with pytest.raises(ValueError, match=r"method=regmean \(input Gram.*needs the train split of task 'colors'.*no train/"):
        run(make_cfg(*POOL, "method=regmean", f"paths.store={tmp_path}/empty"), tmp_path / "r", "regmean")
