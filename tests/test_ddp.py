"""Lightning DDP on two CPU processes (gloo): evaluation counts every sample once, fine-tuning matches one
process, and a Hydra multirun is not re-expanded in child ranks."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.data import Subset

from fusion_bench.clip.model import ImageClassifier
from fusion_bench.evaluation.accuracy import accuracy
from fusion_bench.evaluation.distributed import distributed_accuracy
from fusion_bench.families import build_family
from fusion_bench.stages.evaluate import merged_accuracies, reference_accuracies
from fusion_bench.stages.finetune import ensure_finetuned

ROOT = Path(__file__).resolve().parent.parent
DDP = OmegaConf.create({"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn",
                        "precision": "32-true"})


def test_ddp_evaluation_counts_every_sample_once(make_cfg):
    exp = build_family(make_cfg("taskpool.tasks=[shapes]"))
    data = Subset(exp.tasks["shapes"].split("test"), range(333))  # odd: a padding sampler would repeat one
    clf = ImageClassifier(exp.encoder, exp.head("shapes"))
    single = accuracy(clf, data, 6, batch_size=50)
    by_hand = sum(int(clf(x[None]).argmax() == y) for x, y in data) / 333
    assert single == pytest.approx(by_hand, abs=1e-7)
    ddp = distributed_accuracy(clf, data, 6, batch_size=50, trainer_cfg=DDP)
    assert ddp == single  # exactly: 333 samples, each counted once


def test_ddp_evaluates_several_tasks_in_one_start_of_the_ranks(make_cfg, monkeypatch, tmp_path):
    import lightning as L

    exp = build_family(make_cfg("taskpool.tasks=[shapes,colors,digits]", "trainer=ddp", "trainer.accelerator=cpu",
                                "trainer.precision=32-true", "trainer.devices=2",
                                f"paths.store={tmp_path / 'ddp_store'}"))  # its own reference-accuracy cache
    single = build_family(make_cfg("taskpool.tasks=[shapes,colors,digits]"))
    pre = single.pretrained_state
    sizes = {"shapes": 101, "colors": 77, "digits": 133}  # odd and different: per-task counting, no padding
    for e in (exp, single):
        for t, n in sizes.items():
            e.tasks[t]._cache["val"] = Subset(e.tasks[t].split("val"), range(n))
    starts, test = [], L.Trainer.test
    monkeypatch.setattr(L.Trainer, "test", lambda self, *a, **k: starts.append(1) or test(self, *a, **k))
    assert merged_accuracies(exp, pre, "val") == merged_accuracies(single, pre, "val")  # exactly, per task
    assert len(starts) == 1
    for e in (exp, single):  # references: zero-shot and fine-tuned on val and test, also one start per task
        e.tasks["shapes"]._cache["test"] = Subset(e.tasks["shapes"].split("test"), range(59))
    monkeypatch.setattr("fusion_bench.stages.evaluate.finetuned_state", lambda fam, task: pre)
    assert reference_accuracies(exp, "shapes") == reference_accuracies(single, "shapes")
    assert len(starts) == 2


@pytest.mark.slow
def test_ddp_finetune_matches_single_process(make_cfg, tmp_path):
    fast = ["taskpool.tasks=[textures]", "model.train.steps=30", "model.train.warmup_steps=3",
            "model.train.batch_size=32", "stage=finetune"]
    single = build_family(make_cfg(*fast))
    ddp = build_family(make_cfg(*fast, "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true",
                              "paths.store=" + str(tmp_path / "ddp_store")))
    accs = []
    for exp in (single, ddp):
        ensure_finetuned(exp, "textures")
        accs.append(reference_accuracies(exp, "textures"))
    zs = accs[0]["zeroshot_test"]
    assert accs[0]["zeroshot_test"] == accs[1]["zeroshot_test"]  # DDP evaluation of the same weights: identical
    for a in accs:
        assert a["finetuned_test"] > zs + 0.1
    assert abs(accs[0]["finetuned_test"] - accs[1]["finetuned_test"]) < 0.05


@pytest.mark.slow
def test_ddp_inside_hydra_multirun_is_not_reexpanded(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "stage=finetune", "seed=0,1", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.precision=32-true", "taskpool.tasks=[colors]", "model.train.steps=2",
           "model.train.warmup_steps=1", "model.train.batch_size=8", f"paths.root={tmp_path}",
           "hydra/launcher=basic"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600)
    ckpts = sorted(p.name.split("-")[0] for p in (tmp_path / "store").rglob("*.safetensors"))
    assert ckpts == ["seed0", "seed1"]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # a re-expanded sweep in a child rank would make a second sweep dir
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
