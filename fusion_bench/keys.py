"""Cache keys: what each cached result depends on, decided in one place from the *resolved* config.

Every option counts unless it is listed here as not changing the result, so an option added to a config group
later is part of every key without anyone remembering to add it (a missed cache costs minutes; a stale hit
costs a researcher days). Keys are built from `OmegaConf.to_container(resolve=True)`: unresolved, a data root
enters as the literal `${paths.data_root}` and two copies of the data share one key.

| result                 | depends on                                                                      |
|------------------------|---------------------------------------------------------------------------------|
| fine-tune (the store)  | model (but how it is evaluated), the trained part of finetune.*, the task pool  |
|                        | (data root, version, split parameters, augmentation), seed, and the pretrained  |
|                        | weights themselves (their fingerprint)                                          |
| reference accuracies   | the fine-tune's key, all of finetune.* (posthoc, task_vector change how it is   |
|                        | evaluated), the task pool, the evaluation device and precision, linearized eval |

Not in the fine-tune key, on purpose: the trainer (device, precision, ranks). A fine-tune made on a GPU in
bf16 must be usable by `stage=evaluate` on another machine; the trainer it was made with is recorded in the
checkpoint's metadata instead. Nor the task pool's `control` task (task negation only evaluates it), nor
`finetune.train_head` while it is off (OFF_BY_DEFAULT: stores made before the option existed stay valid).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from fusion_bench.store import config_hash

#: options that change how a result is computed or read, never what it is
HOW_NOT_WHAT = {
    # model.pretrained / hf_id say where the weights are read from; what they are enters as the fingerprint
    "model": ("eval_batch_size", "train.checkpoint_every", "max_new_tokens", "download", "cache_dir", "pretrained",
              "hf_id"),
    "taskpool": ("tasks", "num_workers", "cache_eval", "control"),  # control: evaluated only (task negation)
    # how many fine-tunes run at once: each runs on one thread, the same bytes alone or beside others
    # (fusion_bench/stages/finetune_workers.py); evaluate: how a fine-tune is evaluated (its cached accuracies
    # carry it in their own key, stages/evaluate.py eval_key)
    "finetune": ("workers", "evaluate"),
}
#: finetune.* options added after fine-tunes were stored: while off they are left out of every key, so stores and
#: cached accuracies made before the option existed stay valid (on, they count like any other option)
OFF_BY_DEFAULT = ("train_head",)


def resolved(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _without(d: dict, dotted: tuple[str, ...]) -> dict:
    d = dict(d)
    for path in dotted:
        head, _, rest = path.partition(".")
        if head in d and rest:
            d[head] = _without(d[head], (rest,)) if isinstance(d[head], dict) else d[head]
        elif not rest:
            d.pop(head, None)
    return d


def model_fields(model_cfg) -> dict:
    return _without(resolved(model_cfg), HOW_NOT_WHAT["model"])


def pool_fields(pool_cfg) -> dict:
    return _without(resolved(pool_cfg), HOW_NOT_WHAT["taskpool"])


def finetune_options(finetune) -> dict:
    """finetune.* without the options that change how fine-tunes run, not what they are (HOW_NOT_WHAT)."""
    return _without(resolved(finetune), HOW_NOT_WHAT["finetune"])


def without_off_options(finetune) -> dict:
    """finetune.* options that can change a result, without those of OFF_BY_DEFAULT that are off."""
    return {k: v for k, v in finetune_options(finetune).items() if not (k in OFF_BY_DEFAULT and not v)}


def finetune_fields(cfg: DictConfig, trained: dict, fingerprint: str, **extra) -> dict:
    """The fields that decide a fine-tune's weights (hashed by the store): `trained` is the trained part of
    finetune.* (the model family's `training_config`)."""
    return {"model": model_fields(cfg.model), "finetune": trained, "pool": pool_fields(cfg.taskpool),
            "pretrained": fingerprint, **extra}


def imported_fields(source, fingerprint: str) -> dict:
    """An imported fine-tune is what the file holds: keyed by where it came from and when it was written."""
    return {"imported": str(source.resolve()), "mtime_ns": source.stat().st_mtime_ns, "pretrained": fingerprint}


def reference_key(cfg: DictConfig, evaluation: dict, **extra) -> str:
    """What reference accuracies depend on besides their fine-tune: the task pool, every finetune.* option and
    how evaluation runs (`evaluation`: device, precision, linearized)."""
    return config_hash({"pool": pool_fields(cfg.taskpool), "finetune": without_off_options(cfg.finetune),
                        "evaluation": evaluation, **extra})


def fingerprint(*states: Mapping[str, torch.Tensor]) -> str:
    """A hash of every byte of the given state dicts (names, dtypes, shapes, values): 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    for state in states:
        for k in sorted(state):
            v = state[k].detach().cpu()
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            # hashed from a copy: numpy() on the weight itself would pin its storage's size for good, and
            # fusion_bench.models.offload.parked frees the pretrained weights by resizing their storages
            h.update(v.reshape(-1).view(torch.uint8).clone().numpy())
    return h.hexdigest()
