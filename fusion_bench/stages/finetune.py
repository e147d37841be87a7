"""The finetune stage: one fine-tune per task in the checkpoint store, made once and reused by every later run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from filelock import FileLock

from fusion_bench.families.base import ModelFamily
from fusion_bench.models.offload import parked
from fusion_bench.reporting.memory import release
from fusion_bench.store import CheckpointError

log = logging.getLogger(__name__)


class MissingFinetuneError(FileNotFoundError):
    pass


def ensure_finetuned(fam: ModelFamily, task: str) -> Path:
    """The stored fine-tune of `task`, made first if absent. Jobs that want the same one at once (parallel
    sweeps, SLURM arrays on a shared file system) take turns on a lock: one trains, the others reuse it."""
    path = fam.checkpoint(task)
    if path.is_file():
        log.info("reusing fine-tune %s", path)
        return path
    src = fam.imported(task)
    # a user's file is read and checked (readable, keys, shapes, finite) before anything of it enters the store
    imported = None if src is None else fam.import_finetune(src, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):
        if path.is_file():
            log.info("reusing fine-tune %s (made by a concurrent job)", path)
            return path
        if imported is not None:
            fam.store.save(path, imported, {"task": task, "mode": "standard", "model": fam.cfg.model.name,
                                            "imported_from": str(src.resolve())})
            log.info("imported fine-tune of %s from %s -> %s", task, src, path)
            return path
        return _make(fam, task, path)


def _make(fam: ModelFamily, task: str, path: Path) -> Path:
    cfg = fam.cfg
    module = fam.modes.build_mode_model(fam.mode_cfg, fam.encoder)
    work_dir = path.with_suffix(".partial")
    with parked(fam.encoder, work_dir, keep=module):  # theta_0 waits on disk while its copy trains
        sec = fam.train(task, module, work_dir)
        for p in module.parameters():  # the gradients, and (collected) the trainer with the optimiser state, go
            p.grad = None              # before theta_0 comes back
        release()
    meta = {"task": task, "mode": fam.mode, "model": cfg.model.name, "pretrained": fam.fingerprint,
            "seed": cfg.seed, "seconds_per_step": round(sec, 4),
            "trainer": {k: str(cfg.trainer.get(k)) for k in ("accelerator", "devices", "precision")}}
    head = fam.pop_trained_head(task)
    if head is not None:  # written first: a fine-tune in the store always has its head
        fam.store.save(fam.store.head_path(path), {"head": head.cpu().float()}, {**meta, "head_of": path.name})
    fam.store.save(path, fam.trainable_state(module.cpu()), meta)
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # the resumable checkpoints are spent
    log.info("fine-tuned %s in %.3f s/step -> %s", task, sec, path)
    return path


def finetuned_state(fam: ModelFamily, task: str) -> dict[str, torch.Tensor]:
    """The fine-tune of `task` in merge space, checked against this run's pretrained model. A lazy one (read
    tensor by tensor) is opened and checked once per run; every later stage gets the same mapping."""
    path = fam.checkpoint(task)
    opened = fam.__dict__.setdefault("_opened_finetunes", {})
    if path in opened:
        return opened[path]
    stored = stored_trainable(fam, task)
    state = fam.to_merge_space(stored)
    if state is stored:  # lazy: holds no tensors, cheap to keep
        opened[path] = state
    return state


def stored_trainable(fam: ModelFamily, task: str):
    """The fine-tune of `task` as the store keeps it (the mode's trainable parameters, e.g. LoRA's adapters), read
    tensor by tensor and checked; `finetuned_state` turns it into merge space."""
    path = fam.checkpoint(task)
    if not path.is_file() and fam.imported(task) is not None:
        ensure_finetuned(fam, task)  # an import is read, not trained: any stage does it
    if not path.is_file():
        raise MissingFinetuneError(
            f"missing fine-tune for task {task!r} (mode {fam.mode}, seed {fam.cfg.seed}): {path}\n"
            f"make it with: {fam.finetune_command(task)}")
    stored = fam.store.open(path, expected=fam.pretrained_trainable)  # read tensor by tensor, when needed
    origin = fam.checkpoint_meta(task).get("pretrained")
    if origin is not None and origin != fam.fingerprint:
        raise CheckpointError(f"checkpoint {path} was fine-tuned from another pretrained model (fingerprint "
                              f"{origin}, this run's is {fam.fingerprint}): its task vector would be meaningless")
    return stored


def seconds_per_step(fam: ModelFamily, task: str) -> float | None:
    """Fine-tuning time per step, as recorded in the stored checkpoint."""
    return fam.checkpoint_meta(task).get("seconds_per_step")
