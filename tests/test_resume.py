"""A fine-tune interrupted mid-run resumes from its last checkpoint and ends with the same weights."""

import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from fusion_bench.finetune import train
from fusion_bench.finetune.sampler import StepBatchSampler
from fusion_bench.pipeline import Experiment
from fusion_bench.store import load_safetensors

FAST = ["taskpool.tasks=[colors]", "model.train.steps=16", "model.train.warmup_steps=2",
        "model.train.batch_size=16", "model.train.checkpoint_every=5", "stage=finetune"]


class Crash(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 12:
            raise RuntimeError("simulated crash at step 12")


def test_step_sampler_is_a_function_of_the_step():
    full = list(StepBatchSampler(50, 8, seed=3, max_steps=20))
    assert list(StepBatchSampler(50, 8, seed=3, max_steps=20, start_step=7)) == full[7:]
    assert len(full) == 20 and all(len(b) == 8 for b in full)
    epoch0 = sorted(i for b in full[:6] for i in b)
    assert len(set(epoch0)) == 48  # no sample twice within an epoch


@pytest.mark.slow
def test_interrupted_finetune_resumes_to_identical_weights(make_cfg, tmp_path, monkeypatch):
    straight = Experiment(make_cfg(*FAST, f"paths.store={tmp_path}/a"))
    reference = load_safetensors(straight.ensure_finetuned("colors"))

    crashed = Experiment(make_cfg(*FAST, f"paths.store={tmp_path}/b"))
    with monkeypatch.context() as m:
        m.setattr("fusion_bench.pipeline.finetune", functools.partial(train.finetune, callbacks=[Crash()]))
        with pytest.raises(RuntimeError, match="simulated crash"):
            crashed.ensure_finetuned("colors")
    partial = crashed.checkpoint("colors").with_suffix(".partial") / "checkpoints" / "last.ckpt"
    assert partial.is_file() and not crashed.checkpoint("colors").exists()
    assert torch.load(partial, weights_only=False)["global_step"] == 10

    resumed = load_safetensors(crashed.ensure_finetuned("colors"))
    assert not partial.exists()
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6, msg=k)
