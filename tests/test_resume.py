"""A fine-tune interrupted mid-run resumes from its last checkpoint and ends with the same weights."""

import functools
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from fusion_bench.clip import train
from fusion_bench.data.tiny_eight import SPLIT_SIZES
from fusion_bench.families import build_family
from fusion_bench.finetune.sampler import SeededAugmentation, StepBatchSampler, StepDataLoader
from fusion_bench.finetune.train import FileCheckpointIO
from fusion_bench.stages.finetune import ensure_finetuned
from fusion_bench.store import load_safetensors

ROOT = Path(__file__).resolve().parent.parent

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


def test_step_loader_starts_every_pass_at_the_trainers_step():
    """Lightning sees one epoch of max_steps batches whatever step it resumes at, and each pass over the loader
    (the first after a resume, or one Lightning starts after what it takes for an epoch end) begins with the batch
    of the trainer's current step, not with the sampler's own position."""
    full = list(StepBatchSampler(50, 8, seed=3, max_steps=20))
    step = 0
    loader = StepDataLoader(list(range(50)), StepBatchSampler(50, 8, seed=3, max_steps=20), step=lambda: step)
    assert len(loader) == 20 and [b.tolist() for b in loader] == full
    step = 7
    assert len(loader) == 20 and [b.tolist() for b in loader] == full[7:]
    state = loader.state_dict()
    assert state == {"step": 7, "n": 50, "batch_size": 8, "seed": 3, "max_steps": 20}
    loader.load_state_dict(state)
    for wrong in ({"seed": 4}, {"batch_size": 10}, {"step": 5}):
        with pytest.raises(ValueError, match="data order.*delete the checkpoint's `.partial` directory"):
            loader.load_state_dict({**state, **wrong})


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
        m.setattr("fusion_bench.clip.train.finetune", functools.partial(train.finetune, callbacks=[Crash()]))
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
    ckpt_io, path = FileCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
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


# run.py in a process that SIGKILLs itself, half-way through step `argv[1]` (after its backward pass, before the
# optimizer step): a real fine-tune killed at a known point, with no chance to clean up.
KILLED_RUN = """
import functools, os, runpy, signal, sys
from lightning.pytorch.callbacks import Callback
from fusion_bench.clip import train
from fusion_bench.finetune.train import FileCheckpointIO

class KillAt(Callback):
    def __init__(self, step):
        self.step = step
    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

train.finetune = functools.partial(train.finetune, callbacks=[KillAt(int(sys.argv.pop(1)))])
runpy.run_path("run.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkilled_finetune_resumes_bitwise_across_epoch_boundaries(tmp_path, data_dir):
    """Issue 34: killed fine-tunes resumed to weights up to 8.3e-4 away from an uninterrupted run, once the resumed
    run got past step max_steps - s (its loader had max_steps - s batches; Lightning, which restores its batch
    index s, took the end of them for an epoch end and started the loader again at s). Here one fine-tune of
    60 steps is SIGKILLed at steps 15, 27 and 55 (checkpoints at 10, 20 and 50; 27 and 55 are one step before an
    epoch boundary of the sampler, so the runs resumed at 20 and 50 cross one; the run resumed at 20 gets past
    step 40, where the old loader ran out), the last resume with DataLoader workers: the end result is bitwise the
    uninterrupted run's, in the same store file."""
    per_epoch = SPLIT_SIZES["train"] // 64  # colors: 28 batches of 64 per epoch
    steps, every = 2 * per_epoch + 4, 10
    args = ["taskpool.tasks=[colors]", "stage=finetune", f"model.train.steps={steps}", "model.train.warmup_steps=5",
            f"model.train.checkpoint_every={every}", f"paths.data={data_dir}"]

    def command(root: Path, *extra: str) -> list[str]:
        return [*extra, f"paths.root={root}", *args]

    with open(tmp_path / "reference.log", "w") as out:  # the uninterrupted run, beside the killed ones
        straight = subprocess.Popen([sys.executable, "run.py", *command(tmp_path / "straight")], cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT)
    store = tmp_path / "killed/store/tiny_clip/standard/colors"
    resumed_at = None
    for kill_at in (15, per_epoch - 1, 2 * per_epoch - 1, None):  # checkpoints at 10, 20, 50
        extra = ["+taskpool.num_workers=2"] if kill_at is None else []
        cmd = ["-c", KILLED_RUN, str(kill_at)] if kill_at is not None else ["run.py"]
        done = subprocess.run([sys.executable, *cmd, *command(tmp_path / "killed", *extra)], check=False,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        if resumed_at is not None:
            assert f"resuming from {store}" in done.stderr + done.stdout
            assert "not resumable" not in done.stderr + done.stdout  # Lightning's warning for a resume mid-epoch
        if kill_at is None:
            assert done.returncode == 0, done.stderr[-3000:]
            break
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        [last] = store.glob("*.partial/checkpoints/last.ckpt")
        ckpt = torch.load(last, weights_only=False, map_location="cpu")
        resumed_at = kill_at // every * every
        assert ckpt["global_step"] == resumed_at
        [loader_state] = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert loader_state == {"step": resumed_at, "n": SPLIT_SIZES["train"], "batch_size": 64, "seed": 0,
                                "max_steps": steps}
        assert not list(store.glob("*.safetensors"))
    assert straight.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    [reference_file] = (tmp_path / "straight/store/tiny_clip/standard/colors").glob("*.safetensors")
    [resumed_file] = store.glob("*.safetensors")
    assert resumed_file.name == reference_file.name  # the same cache key
    reference, resumed = load_safetensors(reference_file), load_safetensors(resumed_file)
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
