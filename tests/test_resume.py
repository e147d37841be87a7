"""A fine-tune interrupted mid-run resumes from its last checkpoint and ends with the same weights."""

import functools
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from fusion_bench.families import build_family
from fusion_bench.finetune import train
from fusion_bench.finetune.sampler import SeededAugmentation, StepBatchSampler
from fusion_bench.stages.finetune import ensure_finetuned
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


class _Augmented(torch.utils.data.Dataset):
    """open_clip's real train-time transform (random resized crop) on fixed images."""

    def __init__(self):
        from PIL import Image

        from fusion_bench.data.eight_tasks import clip_transform

        g = torch.Generator().manual_seed(0)
        self.images = [Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())
                       for _ in range(12)]
        self.transform = clip_transform(24, (0.5,) * 3, (0.5,) * 3, train=True)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i


def _batches(start_step: int, workers: int) -> list[torch.Tensor]:
    sampler = StepBatchSampler(12, 4, seed=5, max_steps=9, start_step=start_step, with_seeds=True)
    loader = torch.utils.data.DataLoader(SeededAugmentation(_Augmented()), batch_sampler=sampler,
                                         num_workers=workers)
    return list(loader)


def test_augmentation_is_a_function_of_the_step_with_any_workers():
    one = _batches(0, workers=0)
    crops = [x for (xs, ids) in one for x, i in zip(xs, ids) if i == 0]  # sample 0, once per epoch
    assert len(crops) == 3 and not torch.equal(crops[0], crops[1])  # a new random crop each time
    two = _batches(0, workers=2)
    resumed = _batches(5, workers=2)  # a resume restarts the workers and their RNGs
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(one[5:], resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = torch.get_rng_state()
    SeededAugmentation(_Augmented())[(0, 1)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched


def test_augmentation_seeds_the_cpu_generator_only(monkeypatch):
    """torch.manual_seed per sample cost 60% of every fine-tuning step (it queues the seed for CUDA, XPU and MTIA
    and formats the Python stack each time): the per-sample seed must go to the CPU generator alone, and give
    the same crops torch.manual_seed gave."""
    data = _Augmented()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        expected = data[3][0]

    def forbidden(seed):
        raise AssertionError("torch.manual_seed called per sample")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    torch.testing.assert_close(SeededAugmentation(data)[(3, 77)][0], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_interrupted_finetune_resumes_to_identical_weights(make_cfg, tmp_path, monkeypatch):
    straight = build_family(make_cfg(*FAST, f"paths.store={tmp_path}/a"))
    reference = load_safetensors(ensure_finetuned(straight, "colors"))

    crashed = build_family(make_cfg(*FAST, f"paths.store={tmp_path}/b"))
    with monkeypatch.context() as m:
        m.setattr("fusion_bench.families.clip.finetune", functools.partial(train.finetune, callbacks=[Crash()]))
        with pytest.raises(RuntimeError, match="simulated crash"):
            ensure_finetuned(crashed, "colors")
    partial = crashed.checkpoint("colors").with_suffix(".partial") / "checkpoints" / "last.ckpt"
    assert partial.is_file() and not crashed.checkpoint("colors").exists()
    assert torch.load(partial, weights_only=False)["global_step"] == 10

    resumed = load_safetensors(ensure_finetuned(crashed, "colors"))
    assert not partial.exists()
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6, msg=k)


def test_checkpoint_is_written_to_its_file_atomically_not_through_memory(tmp_path, monkeypatch):
    """FileCheckpointIO: torch.save straight into a temporary file, renamed over last.ckpt. A save cut short leaves
    the previous checkpoint whole, and the checkpoint is never serialised into a buffer first (Lightning's own
    save does that: weights and both AdamW moments, 3.4 GiB more at the peak of a ViT-L/14 fine-tune)."""
    ckpt_io, path = train.FileCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    targets, real_save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: targets.append(f) or real_save(obj, f, *a, **k))
    ckpt_io.save_checkpoint({"w": torch.arange(4.0), "global_step": 5}, path)
    assert [isinstance(t, str | Path) for t in targets] == [True]  # a file, not an io.BytesIO
    assert torch.load(path)["global_step"] == 5

    def cut_short(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint({"w": torch.zeros(4), "global_step": 10}, path)
    assert torch.load(path)["global_step"] == 5
    torch.testing.assert_close(torch.load(path)["w"], torch.arange(4.0), rtol=0, atol=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind
