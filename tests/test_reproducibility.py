"""Numbers that reproduce: fp32 logits under bf16 autocast, cache keys holding everything a result depends on
(and nothing else), fingerprints of the pretrained weights for every mode, analyses that evaluate as the
pipeline does, and evaluation that leaves the train/eval mode of what it was given."""

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fusion_bench.clip.model import ImageClassifier
from fusion_bench.evaluation.accuracy import accuracy
from fusion_bench.families import build_family
from fusion_bench.stages.evaluate import eval_key
from fusion_bench.stages.merge import Method


# ---- 1. logits in fp32 under autocast ---------------------------------------------------------------------------
def test_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    encoder = nn.Linear(16, 32)
    head = 100 * nn.functional.normalize(torch.randn(397, 32), dim=-1)  # CLIP's logit scale, SUN397's classes
    x = torch.randn(64, 16)
    clf = ImageClassifier(encoder, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = clf(x)
        feats = encoder(x)  # bf16: the encoder itself runs under autocast
    assert logits.dtype == torch.float32
    f = feats.float()
    expected = (f / f.norm(dim=-1, keepdim=True)) @ head.T  # fp32 normalisation and head product, by hand
    torch.testing.assert_close(logits, expected)


# ---- 2, 3. cache keys -------------------------------------------------------------------------------------------
POOL = ["taskpool=eight_tasks", "paths.data_root=/data/a"]


def _ckpt(make_cfg, *overrides):
    return build_family(make_cfg(*POOL, *overrides)).checkpoint("mnist")


def _ref_key(make_cfg, *overrides):
    cfg = make_cfg(*POOL, *overrides)
    fam = build_family(cfg)
    return eval_key(fam, Method(cfg.method, fam.mode).evaluate_linearized)


MATTERS_FOR_FINETUNES = ["paths.data_root=/data/b", "taskpool.val_fraction=0.2", "taskpool.max_val=100",
                         "taskpool.split_seed=1", "taskpool.train_augment=false", "model.train.lr=1e-4",
                         "model.train.steps=10", "model.train.batch_size=8", "model.train.warmup_steps=1",
                         "model.train.weight_decay=0.0", "seed=1", "finetune=attention",
                         "+finetune.train_bias=true"]
DOES_NOT_MATTER_FOR_FINETUNES = ["taskpool.num_workers=0", "taskpool.cache_eval=false", "model.eval_batch_size=7",
                                 "model.train.checkpoint_every=3", "trainer.precision=bf16-mixed",
                                 "taskpool.tasks=[mnist,svhn]", "method=ties", "paths.root=/elsewhere"]


@pytest.mark.parametrize("override", MATTERS_FOR_FINETUNES)
def test_finetune_key_holds_what_decides_the_weights(make_cfg, override):
    assert _ckpt(make_cfg, override) != _ckpt(make_cfg)


@pytest.mark.parametrize("override", DOES_NOT_MATTER_FOR_FINETUNES)
def test_finetune_key_ignores_how_it_is_used(make_cfg, override, tmp_path):
    base = _ckpt(make_cfg).relative_to(tmp_path)
    assert _ckpt(make_cfg, override).relative_to(tmp_path if "paths.root" not in override else "/elsewhere") == base


def test_posthoc_linearization_and_lora_task_vectors_share_checkpoints(make_cfg):
    assert _ckpt(make_cfg, "finetune=linear", "finetune.posthoc=true") == _ckpt(make_cfg)
    assert _ckpt(make_cfg, "finetune=lora", "finetune.task_vector=adapters") == _ckpt(make_cfg, "finetune=lora")


@pytest.mark.parametrize("override", ["paths.data_root=/data/b", "eval_precision=bf16-mixed",
                                      "taskpool.split_seed=1", "taskpool.max_val=100", "finetune=linear",
                                      "model.train.lr=1e-4"])
def test_reference_accuracies_key_holds_data_precision_and_split(make_cfg, override):
    key = (_ckpt(make_cfg, override), _ref_key(make_cfg, override))
    assert key != (_ckpt(make_cfg), _ref_key(make_cfg))


@pytest.mark.parametrize("override", ["taskpool.num_workers=0", "taskpool.cache_eval=false", "method=ties",
                                      "trainer.precision=bf16-mixed"])  # evaluated at eval_precision (fp32)
def test_reference_accuracies_key_ignores_how_data_is_read(make_cfg, override):
    assert _ref_key(make_cfg, override) == _ref_key(make_cfg)


def test_reference_key_differs_for_linearized_evaluation(make_cfg):
    assert _ref_key(make_cfg, "finetune=l_lora", "method=partial_linearization") != _ref_key(make_cfg,
                                                                                              "finetune=l_lora")


# ---- 4. fingerprints of the pretrained weights ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["standard", "linear", "attention", "linear_layers", "lora", "l_lora"])
def test_fingerprint_covers_the_pretrained_encoder_in_every_mode(make_cfg, tmp_path, mode):
    from fusion_bench.store import atomic_save_safetensors

    mine = build_family(make_cfg(f"finetune={mode}"))
    other = tmp_path / "other_clip.safetensors"
    from fusion_bench.clip.model import load_clip

    whole = load_clip(mine.cfg.model).state_dict()
    state = {k: v.clone() for k, v in whole.items()}
    state["visual.ln_post.weight"] += 0.01  # a weight no mode trains: only the fingerprint can see it
    atomic_save_safetensors(state, other)
    foreign = build_family(make_cfg(f"finetune={mode}", f"model.pretrained={other}"))
    assert foreign.fingerprint != mine.fingerprint
    assert foreign.checkpoint("digits") != mine.checkpoint("digits")  # a miss, not a silent reuse
    same = tmp_path / "same_clip.safetensors"
    atomic_save_safetensors(whole, same)
    assert build_family(make_cfg(f"finetune={mode}", f"model.pretrained={same}")).checkpoint("digits") == \
        mine.checkpoint("digits")  # the same weights read from another file: a hit


# ---- 5. analyses evaluate as the pipeline does ------------------------------------------------------------------
def _two_task_experiment(make_cfg, monkeypatch, *overrides):
    cfg = make_cfg("taskpool.tasks=[shapes,colors]", "model.eval_batch_size=32", *overrides)
    exp = build_family(cfg)
    for t in exp.tasks:
        for split, n in (("val", 40), ("test", 40)):
            exp.tasks[t]._cache[split] = Subset(exp.tasks[t].split(split), range(n))
    g = torch.Generator().manual_seed(2)
    fts = {t: {k: v + v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g)
               for k, v in exp.pretrained_state.items()} for t in exp.tasks}
    for where in ("fusion_bench.analyses.disentanglement", "fusion_bench.analyses.num_tasks",
                  "fusion_bench.stages.evaluate"):
        monkeypatch.setattr(f"{where}.finetuned_state", lambda fam, task: fts[task])
    return exp, Method(cfg.method, exp.mode), fts


def test_disentanglement_evaluates_linearized_under_partial_linearization(make_cfg, monkeypatch):
    from fusion_bench.analyses.disentanglement import disentanglement_error

    exp, method, _ = _two_task_experiment(make_cfg, monkeypatch, "finetune=l_lora", "method=partial_linearization")
    seen, real = [], exp.model_with
    exp.model_with = lambda merged, linearized=False: seen.append(linearized) or real(merged, linearized)
    disentanglement_error(exp, method, ["shapes", "colors"], [0.0, 1.0])
    assert seen and all(seen)


def test_num_tasks_searches_the_coefficient_on_val_per_subset(make_cfg, monkeypatch):
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from fusion_bench.analyses.num_tasks import normalized_vs_num_tasks

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        assert compose("config", overrides=["analysis=num_tasks"]).analysis.scaling_coef == "search"
    from fusion_bench.stages.evaluate import grid_accuracies

    exp, method, fts = _two_task_experiment(make_cfg, monkeypatch)
    searched = []
    monkeypatch.setattr("fusion_bench.analyses.num_tasks.grid_accuracies",
                        lambda fam, m, states, grid, split, tasks=None: searched.append((len(states), split))
                        or grid_accuracies(fam, m, states, grid, split, tasks))
    curve = normalized_vs_num_tasks(exp, method, "search", max_subsets=4)
    assert searched == [(2, "val")]
    coef = curve[2]["scaling_coefs"][0]
    val = grid_accuracies(exp, method, [fts[t] for t in exp.tasks], [coef], "val")
    assert coef in [round(0.05 * i, 2) for i in range(21)] and 0 < val[0]["shapes"] <= 1


# ---- 6. evaluation restores the modes it was given --------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_evaluation_leaves_a_shared_encoder_in_its_mode(training):
    encoder = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train(training)
    data = TensorDataset(torch.randn(20, 8), torch.randint(0, 3, (20,)))
    accuracy(ImageClassifier(encoder, torch.randn(3, 4)), data, 3, batch_size=8)
    assert all(m.training == training for m in encoder.modules())
