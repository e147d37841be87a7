"""End to end on two tiny tasks: finetune -> merge -> evaluate -> report, reuse of the store, stage errors."""

import json

import pytest

from fusion_bench.pipeline import run
from fusion_bench.stages.finetune import MissingFinetuneError
from fusion_bench.store import CheckpointError

# lr 1e-3 (the default is 2e-4): 15 steps must move the two tasks clearly above zero-shot
FAST = ["taskpool.tasks=[digits,textures]", "method.scaling_coef=0.3", "model.train.steps=15", "model.train.warmup_steps=3",
        "model.train.batch_size=32", "model.train.checkpoint_every=10", "model.train.lr=1e-3"]


@pytest.mark.slow
def test_end_to_end_two_tasks(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*FAST)
    with pytest.raises(MissingFinetuneError, match=r"python run.py stage=finetune model=tiny_clip"):
        run(make_cfg(*FAST, "stage=merge"), tmp_path / "merge0", "task_arithmetic")

    report = run(cfg, tmp_path / "run1", "task_arithmetic")
    saved = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "run1" / "report.md").read_text().count("|") > 20
    assert saved["model"] == "tiny_clip" and saved["finetune"] == "standard" and saved["method"] == "task_arithmetic"
    assert saved["scaling_coef"] == 0.3
    for task in ("digits", "textures"):
        r = saved["tasks"][task]
        assert all(0.0 <= r[k] <= 1.0 for k in ("zeroshot", "finetuned", "merged"))
        assert r["normalized"] == pytest.approx(r["merged"] / r["finetuned"])
    avg = saved["average"]
    assert avg["merged"] == pytest.approx((saved["tasks"]["digits"]["merged"] + saved["tasks"]["textures"]["merged"]) / 2)
    # fine-tuning helps on its own task even after 15 steps
    assert avg["finetuned"] > avg["zeroshot"]

    # a rerun reuses the stored fine-tunes: training must not be called again
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("retrained a cached task"))
    again = run(make_cfg(*FAST), tmp_path / "run2", "task_arithmetic")
    assert again["tasks"] == report["tasks"]

    # stage=merge writes merged weights; a same-seed run gives identical accuracies
    run(make_cfg(*FAST, "stage=merge"), tmp_path / "merge1", "task_arithmetic")
    assert (tmp_path / "merge1" / "merged.safetensors").stat().st_size > 1e6

    # a corrupted checkpoint is refused with its path in the message
    store = next((tmp_path / "store").rglob("*digits*/*.safetensors"))
    store.write_bytes(store.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(store)):
        run(make_cfg(*FAST, "stage=evaluate"), tmp_path / "run3", "task_arithmetic")


@pytest.mark.slow
def test_scaling_coef_search_on_val(make_cfg, tmp_path):
    report = run(make_cfg(*FAST, "taskpool.tasks=[colors,position]", "method.scaling_coef=search"),
                 tmp_path, "task_arithmetic")
    grid = report["search"]["grid"]
    assert grid == [round(0.05 * i, 2) for i in range(21)] and "0.15" in json.dumps(grid)
    best = max(range(21), key=lambda i: report["search"]["val_normalized"][i])
    assert report["scaling_coef"] == grid[best]


def test_config_errors_caught_before_training(make_cfg, tmp_path):
    from fusion_bench.families import build_family

    with pytest.raises(ValueError, match="unknown task"):
        build_family(make_cfg("taskpool.tasks=[digits,imagenet]"))
    with pytest.raises(ValueError, match="stage"):
        build_family(make_cfg("stage=train"))
    with pytest.raises(ValueError, match="3 values for 2 tasks"):
        build_family(make_cfg("taskpool.tasks=[digits,shapes]", "method.scaling_coef=[0.1,0.2,0.3]"))


@pytest.mark.slow
def test_same_seed_same_report_and_foreign_task_vectors_refused(make_cfg, tmp_path):
    import shutil

    from fusion_bench.clip.model import create_clip
    from fusion_bench.families import build_family
    from fusion_bench.stages.finetune import finetuned_state
    from fusion_bench.store import atomic_save_safetensors

    fast = ["taskpool.tasks=[textures,counting]", "method.scaling_coef=0.3", "model.train.steps=10",
            "model.train.warmup_steps=2", "model.train.batch_size=32"]
    a = run(make_cfg(*fast, f"paths.store={tmp_path}/store_a"), tmp_path / "a", "task_arithmetic")
    b = run(make_cfg(*fast, f"paths.store={tmp_path}/store_b"), tmp_path / "b", "task_arithmetic")
    assert a["tasks"] == b["tasks"]  # two independent fine-tunes with the same seed: identical accuracies

    other = tmp_path / "other_clip.safetensors"
    atomic_save_safetensors(create_clip("tiny-clip").state_dict(), other)
    mine = build_family(make_cfg(*fast, f"paths.store={tmp_path}/store_a"))
    foreign = build_family(make_cfg(*fast, f"paths.store={tmp_path}/store_a", f"model.pretrained={other}"))
    foreign.checkpoint("textures").parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(mine.checkpoint("textures"), foreign.checkpoint("textures"))
    with pytest.raises(CheckpointError, match="fine-tuned from another pretrained model"):
        finetuned_state(foreign, "textures")


@pytest.mark.slow
def test_parallel_jobs_wanting_the_same_fine_tune_train_it_once(tmp_path):
    """Two joblib workers of one sweep need the same fine-tune at the same time: one trains, the other waits on
    the store's lock and reuses it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "run.py", "-m", "stage=finetune", "method=task_arithmetic,ties", "taskpool.tasks=[colors]",
           "model.train.steps=20", "model.train.warmup_steps=2", "model.train.batch_size=16",
           f"paths.root={tmp_path}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    subprocess.run(cmd, cwd=root, check=True, timeout=600, capture_output=True)
    logs = [p.read_text() for p in sorted((tmp_path / "multirun").glob("*/*/*/run.log"))]
    assert len(logs) == 2
    assert sum("fine-tuned colors" in log for log in logs) == 1
    assert sum("reusing fine-tune" in log for log in logs) == 1  # (made by a concurrent job) unless it came late
    assert len(list((tmp_path / "store").rglob("*.safetensors"))) == 1
