"""What every family's fine-tuning shares: a Lightning fit resumable from its last checkpoint (atomic, step-exact),
the cosine schedule with warmup, and the step reporter of the run's display. CLIP's LightningModule is
fusion_bench/clip/train.py, T5's fusion_bench/t5/train.py."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from fusion_bench.finetune.progress import Sink, current_sink
from fusion_bench.store import atomic_write

log = logging.getLogger(__name__)


class StepReporter(Callback):
    """Sends (step, total, loss, s/step) to the sink after every optimizer step; s/step over this fit's steps
    (a resumed fit counts from where it resumed)."""

    def __init__(self, sink: Sink):
        self.sink, self.t0, self.first = sink, 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0, self.first = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = trainer.global_step
        per_step = (time.perf_counter() - self.t0) / max(1, step - self.first)
        self.sink(step, int(trainer.max_steps), float(loss), per_step)


class FileCheckpointIO(TorchCheckpointIO):
    """torch.save straight into a temporary file, then renamed over the checkpoint: atomic like Lightning's own
    save, which first serialises the whole checkpoint into memory (weights and AdamW's two moments, three times the
    trainable parameters: 3.4 GiB more at the peak of a ViT-L/14 fine-tune)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class ResumeCheckpoint(ModelCheckpoint):
    """last.ckpt every `every_n_train_steps`, to resume an interrupted fine-tune; none when training ends (the
    fine-tune goes to the store right after, and the checkpoints are deleted)."""

    def on_train_end(self, trainer, pl_module) -> None:
        pass


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's notices at every fit (GPU / TPU available, a logging-service tip, `max_steps` reached) and its
    own deprecated use of torch's LeafSpec, silenced at their source; Lightning's warnings stay."""
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = notices.level
    notices.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        notices.setLevel(level)


def fit_resumable(lm: L.LightningModule, train_cfg: DictConfig, trainer_cfg: DictConfig, work_dir: Path,
                  callbacks: list[Callback] = ()) -> float:
    """trainer.fit for train_cfg.steps steps, resuming from work_dir/checkpoints/last.ckpt if a run was cut short."""
    last = work_dir / "checkpoints" / "last.ckpt"
    sink = current_sink()  # the run's display (fusion_bench/finetune/progress.py), else Lightning's own bar
    bar = StepReporter(sink) if sink is not None else RichProgressBar(leave=True)
    with quiet_lightning():
        trainer: L.Trainer = instantiate(
            trainer_cfg,
            max_steps=train_cfg.steps,
            default_root_dir=str(work_dir),
            logger=[CSVLogger(str(work_dir), name="logs"), TensorBoardLogger(str(work_dir), name="tb")],
            callbacks=[ResumeCheckpoint(dirpath=str(last.parent), every_n_train_steps=train_cfg.checkpoint_every,
                                        save_last=True, save_top_k=0), bar, *callbacks],
            plugins=[FileCheckpointIO()],
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_model_summary=False,
            enable_progress_bar=sink is None,
            use_distributed_sampler=False,  # StepBatchSampler shards each global batch over the ranks itself
        )
        if train_cfg.batch_size % trainer.world_size:
            raise ValueError(f"model.train.batch_size={train_cfg.batch_size} must divide over {trainer.world_size} "
                             f"ranks")
        resume = str(last) if last.is_file() else None
        if resume:
            log.info("resuming from %s", resume)
        t0 = time.perf_counter()
        trainer.fit(lm, ckpt_path=resume)
    return (time.perf_counter() - t0) / max(1, train_cfg.steps)
