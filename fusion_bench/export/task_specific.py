"""The file of a task-specific merge (TALL masks, EMR): shared weights, bit-packed per-task masks, rescalers.

`task_specific.safetensors` holds, for every merged (float) key of the merge space:

* `shared.<key>`: the shared vector v (fp32, the key's shape);
* `masks.<key>`: the T task masks m_t, bit-packed: uint8 of shape (T, ceil(numel / 8)); bit j % 8 (least
  significant first, numpy's `packbits(bitorder="little")`) of byte j // 8 of row t is m_t at flat index j;

and the JSON metadata (the safetensors header): `format` (FORMAT), `method`, `tasks` (names, in row order),
`rescalers` (l_t, one per task), `shapes` ({key: shape}), `pretrained` (a fingerprint of theta_0, fusion_bench.keys).
Task t's weights are

    theta_t[key] = theta_0[key] + rescalers[t] * unpack(masks.<key>)[t] * shared.<key>

and theta_0[key] for the keys without a mask. `load_task_weights(path, task, pretrained)` gives them back from the
pretrained weights in the same space (`family.pretrained_state`; for CLIP finetune=standard the image tower's
open_clip state dict), checked against the fingerprint; `read_task_specific` gives the whole TaskSpecificMerge.
Masks cost 1 bit per parameter and task on disk, as the papers count them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusion_bench import keys
from fusion_bench.export.files import new_file
from fusion_bench.merging.task_specific import TaskSpecificMerge

FORMAT = "fusion_bench.task_specific/2"
FORMULA = "theta_t = theta_0 + rescalers[t] * unpack(masks.<key>)[t] * shared.<key>"
_BITS = 2 ** torch.arange(8, dtype=torch.int32)  # bit j of a byte holds entry 8 * byte + j
_BITS_U8 = _BITS.to(torch.uint8)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bool (T, *shape) -> uint8 (T, ceil(numel / 8)), little bit order."""
    flat = masks.reshape(masks.shape[0], -1)
    pad = (-flat.shape[1]) % 8
    flat = torch.nn.functional.pad(flat.to(torch.int32), (0, pad))
    return (flat.reshape(flat.shape[0], -1, 8) * _BITS).sum(-1).to(torch.uint8)


def unpack_masks(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 (T, ceil(numel / 8)) -> bool (T, *shape): the inverse of pack_masks."""
    numel = math.prod(shape)
    bits = (packed[..., None] & _BITS_U8).ne(0).reshape(packed.shape[0], -1)
    return bits[:, :numel].reshape(packed.shape[0], *shape)


def _fingerprint(pretrained: Mapping[str, torch.Tensor], names: list[str]) -> str:
    return keys.fingerprint({k: pretrained[k] for k in names})


def write_task_specific(merge: TaskSpecificMerge, path: str | Path, tasks: list[str]) -> Path:
    """`merge` (one row per task of `tasks`) as task_specific.safetensors at `path` (which must not exist)."""
    if len(tasks) != merge.n_tasks:
        raise ValueError(f"{merge.method}: {merge.n_tasks} task masks for {len(tasks)} task names {tasks}")
    tensors = {**{f"shared.{k}": v for k, v in merge.shared.items()},
               **{f"masks.{k}": pack_masks(m) for k, m in merge.masks.items()}}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "formula": FORMULA, "method": merge.method, "tasks": json.dumps(list(tasks)),
            "rescalers": json.dumps(merge.rescalers), "rescaler_bits": str(merge.rescaler_bits),
            "shapes": json.dumps({k: list(v.shape) for k, v in merge.shared.items()}),
            "keys": json.dumps(merge.keys), "pretrained": _fingerprint(merge.pretrained, merge.keys)}
    return new_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict:
    """The metadata of a task_specific.safetensors, JSON fields decoded."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={meta.get('format')!r})")
    out = dict(meta)
    for k in ("tasks", "rescalers", "shapes", "keys"):
        out[k] = json.loads(meta[k])
    out["rescaler_bits"] = int(meta["rescaler_bits"])
    return out


def read_task_specific(path: str | Path, pretrained: Mapping[str, torch.Tensor]) -> TaskSpecificMerge:
    """The TaskSpecificMerge stored at `path`, over `pretrained` (theta_0 in the merge space it was made in)."""
    meta = read_metadata(path)
    missing = [k for k in meta["keys"] if k not in pretrained]
    if missing:
        raise KeyError(f"{path}: the pretrained weights given lack {missing[:5]} ({len(missing)} keys): give theta_0 "
                       "in the space the merge was made in (e.g. fusion_bench's family.pretrained_state)")
    got = _fingerprint(pretrained, meta["keys"])
    if got != meta["pretrained"]:
        raise ValueError(f"{path} was merged from other pretrained weights (fingerprint {meta['pretrained']}, "
                         f"given {got})")
    shared, masks = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key, shape in meta["shapes"].items():
            shared[key] = f.get_tensor(f"shared.{key}")
            masks[key] = unpack_masks(f.get_tensor(f"masks.{key}"), tuple(shape))
    return TaskSpecificMerge(pretrained=pretrained, shared=shared, masks=masks, rescalers=meta["rescalers"],
                             method=meta["method"], rescaler_bits=meta["rescaler_bits"], keys=meta["keys"])


def load_task_weights(path: str | Path, task: str | int, pretrained: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """Task `task`'s weights (a task name or row index) of the merge stored at `path`, over `pretrained`."""
    merge = read_task_specific(path, pretrained)
    tasks = read_metadata(path)["tasks"]
    if isinstance(task, str):
        if task not in tasks:
            raise KeyError(f"{path} has no task {task!r}; it holds {tasks}")
        task = tasks.index(task)
    return merge.task_weights(task)
