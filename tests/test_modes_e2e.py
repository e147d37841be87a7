"""Every fine-tuning mode fine-tunes, merges and evaluates end to end on two tiny tasks through the pipeline."""

import pytest
from safetensors import safe_open

from fusion_bench.families import build_family
from fusion_bench.models.modes import trainable_state
from fusion_bench.pipeline import run

FAST = ["taskpool.tasks=[colors,position]", "model.train.steps=8", "model.train.warmup_steps=2",
        "model.train.batch_size=32", "model.train.checkpoint_every=10"]


def stored_keys(tmp_path, mode):
    files = sorted((tmp_path / "store" / "tiny_clip" / mode).rglob("*.safetensors"))
    assert len(files) == 2, files
    keys = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys.append(set(h.keys()))
    return keys


def check_report(report, mode, method):
    assert report["finetune"] == mode and report["method"] == method
    for task in ("colors", "position"):
        r = report["tasks"][task]
        assert all(0.0 <= r[k] <= 1.0 for k in ("zeroshot", "finetuned", "merged")), r


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["finetune=linear"],
    ["finetune=attention"],
    ["finetune=linear_layers"],
    ["finetune=lora"],
], ids=lambda o: " ".join(o))
def test_mode_end_to_end(make_cfg, tmp_path, overrides):
    cfg = make_cfg(*overrides, *FAST, "method=task_arithmetic")
    mode = cfg.finetune.mode
    check_report(run(cfg, tmp_path / "run", "task_arithmetic"), mode, "task_arithmetic")
    expected = set(trainable_state(build_family(cfg).base))
    assert all(keys == expected for keys in stored_keys(tmp_path, mode))
    if mode == "lora":
        assert all(".lora_A." in k or ".lora_B." in k for k in expected)
    if mode == "attention":
        assert all(k.endswith(("attn.in_proj_weight", "attn.out_proj.weight")) for k in expected)


@pytest.mark.slow
def test_l_lora_end_to_end_then_partial_linearization(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("finetune=l_lora", *FAST, "method=task_arithmetic")
    ta = run(cfg, tmp_path / "ta", "task_arithmetic")
    check_report(ta, "l_lora", "task_arithmetic")
    expected = set(trainable_state(build_family(cfg).base))
    assert all(".lora_" in k for k in expected)
    assert all(keys == expected for keys in stored_keys(tmp_path, "l_lora"))

    # the same fine-tunes, merged by task arithmetic and evaluated through the linearized adapters
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("retrained a cached task"))
    pl = run(make_cfg("finetune=l_lora", *FAST, "method=partial_linearization"), tmp_path / "pl",
             "partial_linearization")
    check_report(pl, "l_lora", "partial_linearization")
    # same pretrained point; the individual fine-tunes are re-evaluated linearized, so normalized compares like with like
    assert all(pl["tasks"][t]["zeroshot"] == ta["tasks"][t]["zeroshot"] for t in ("colors", "position"))
    assert len(list(tmp_path.rglob("*.eval-*.json"))) == 4  # linearized references are cached apart

    # finetune.evaluate=linearized: any method evaluated through the linearized adapters; task arithmetic so
    # evaluated is partial linearization, number for number, from the same fine-tunes and cached references
    lin = run(make_cfg("finetune=l_lora", "finetune.evaluate=linearized", *FAST, "method=task_arithmetic",
                       f"method.scaling_coef={pl['scaling_coef']}"), tmp_path / "lin", "task_arithmetic")
    assert lin["tasks"] == pl["tasks"]
    assert len(list(tmp_path.rglob("*.eval-*.json"))) == 4


@pytest.mark.slow
def test_posthoc_linearization_reuses_standard_finetunes(make_cfg, tmp_path, monkeypatch):
    std = run(make_cfg(*FAST, "method.scaling_coef=0.3"), tmp_path / "std", "task_arithmetic")
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("retrained a cached task"))
    post = run(make_cfg(*FAST, "finetune=linear", "finetune.posthoc=true", "method.scaling_coef=0.3"),
               tmp_path / "post", "task_arithmetic")
    check_report(post, "linear", "task_arithmetic")
    assert all(post["tasks"][t]["zeroshot"] == std["tasks"][t]["zeroshot"] for t in ("colors", "position"))
    # the same weights evaluated through the linearized encoder: reference accuracies are cached apart
    assert len(list((tmp_path / "store").rglob("*.eval-*.json"))) == 4
