"""Input Gram matrices of every linear map of a model (the statistics RegMean needs).

For a linear map ``y = W x`` (``W``: ``[out, in]``) the Gram is the mean of ``x x^T`` over the positions counted
for that map::

    G = (1 / P) sum_{p counted} x_p x_p^T          fp32, [in, in], keyed by the weight's name

where a *position* is one row of the map's input flattened to ``[-1, in]`` (one token of one sample: a ViT block
sees ``N * tokens`` rows, open_clip's ``proj`` sees ``N`` pooled rows) and ``P`` is the number of positions counted
**for that map** over all batches (not the number of samples ``N``).  Which positions count:

- by default every row that enters the map.  This is what both references count: bloomberg/dataless-model-merging
  (``MyModelTrainer.compute_grams`` in src/model_merge/local_trainer.py) and the reference framework
  tanganke/fusion_bench (the hook of ``regmean_merging`` in fusion_bench/method/regmean/regmean.py) reshape the
  input to ``[-1, in]`` and keep the running mean ``sum x x^T / rows`` per module;
- with ``positions``, only the rows its boolean mask marks.  The model families of padded sequences pass one that
  drops padding (T5: encoder positions with ``attention_mask == 0``, decoder positions whose label is -100; see
  fusion_bench/t5/family.py).  This departs from the references, whose padded batches also count the pad
  positions: with padding to the longest sequence of a batch, a task's Gram would then depend on how its
  examples were batched, and a padded position is no input of any example.

Why per position and not per sample: RegMean solves ``min_W sum_t ||X_t W^T - X_t W_t^T||^2`` with ``G_t`` in
place of ``X_t^T X_t``, so the *scale* of ``G_t`` is how much task ``t`` weighs in the merge.  Divided by the
number of samples, ``G_t`` grows with the task's (padded) sequence length: a task of 40-token inputs would weigh
5x a task of 8-token inputs.  Divided by the positions counted, every task weighs by the second moment of its
inputs.  For CLIP every image has the same number of tokens (50 at ViT-B/32, 257 at ViT-L/14), so per position
and per sample differ by one constant factor common to all tasks of a layer, and RegMean's merge is the same
(up to float rounding).  Versions (:data:`GRAMS_VERSION`, part of a stored statistic's key): 1 divided by the
number of samples with padding counted; 2 is the definition above.

Linear maps found:

- every ``nn.Linear`` (its input, flattened to ``[-1, in]``), except the ``out_proj`` of an
  ``nn.MultiheadAttention``: MHA applies it through its weight inside ``F.multi_head_attention_forward``,
  so a hook on it never fires; its input is recomputed from the MHA's inputs (:func:`mha_out_proj_input`);
- ``nn.MultiheadAttention.in_proj_weight`` (self-attention only: its input is the query) or, with separate
  projections, ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` (query / key / value);
- a module's bare 2-D ``in_proj_weight`` applied as ``F.linear(x, self.in_proj_weight, ...)`` to its first
  argument (open_clip's ``Attention``);
- a bare 2-D ``proj`` used as ``pooled @ self.proj`` (open_clip's ``VisionTransformer``): ``W = proj^T`` and
  the Gram (key ``...proj``) is that of ``pooled``, ``[proj.shape[0]]^2``.  ``pooled`` is obtained exactly by
  running the module with ``proj`` set to ``None`` (its forward skips the product) and applying it in a hook.

With ``norm_scales=True`` (LOT Merging, fusion_bench/merging/lot.py) also, for every normalisation layer with a 1-D
scale ``y = w * x_hat (+ b)``, the per-dimension mean of ``x_hat * x_hat`` over the same positions (a ``[d]`` vector
keyed by the scale's name: the diagonal of the Gram of ``x_hat``, what an element-wise product's least squares
needs), where ``x_hat`` is recomputed exactly from the layer's input:

- ``nn.LayerNorm`` (open_clip's ``LayerNorm`` too) over its last dimension: ``F.layer_norm(x, shape, eps=eps)``;
- ``nn.RMSNorm``, and a Hugging Face RMS norm (a module with a 1-D ``weight``, no bias, a ``variance_epsilon``:
  T5's ``T5LayerNorm``): ``x * rsqrt(mean(x^2) + eps)`` in fp32.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor, nn

from fusion_bench.devices import eval_mode

from .attention import MHA_SIGNATURE, mha_out_proj_input

log = logging.getLogger(__name__)


def _forward_source(module: nn.Module) -> str:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def _linear_maps(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{weight key: (module, role)}`` for every linear map (see the module docstring), parameter order."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[nn.Module, str]] = {}
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for where, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            roles = ["in_proj_weight"] if m._qkv_same_embed_dim else [f"{c}_proj_weight" for c in "qkv"]
            for role in roles:
                found[names[id(getattr(m, role))]] = (m, role)
            found[names[id(m.out_proj.weight)]] = (m, "out_proj")
        elif isinstance(m, nn.Linear):
            if id(m) not in mha_out:  # an MHA's out_proj is handled by its MHA: a hook on it never fires
                found[names[id(m.weight)]] = (m, "linear")
        else:
            for attr, pattern in _BARE:
                p = m._parameters.get(attr)
                if p is None or p.dim() != 2:
                    continue
                if not re.search(pattern, _forward_source(m)):
                    log.warning(
                        "input_grams: module %r (%s) has a 2-D parameter %r used in a way input_grams does "
                        "not know: no Gram for %r",
                        where, type(m).__name__, attr, names[id(p)],
                    )  # fmt: skip
                    continue
                found[names[id(p)]] = (m, attr)
    order = {n: i for i, n in enumerate(names.values())}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


#: bare 2-D parameters applied to a module's input: (attribute, pattern its forward source must match)
_BARE = (
    ("in_proj_weight", r"F\.linear\(\s*x\s*,\s*self\.in_proj_weight"),  # open_clip Attention(x)
    ("proj", r"if self\.proj is not None:\s*\n\s*(\w+) = \1 @ self\.proj\b"),  # VisionTransformer
)


def _norm_scales(model: nn.Module) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
    """``{scale key: (norm module, x -> x_hat)}`` for every normalisation layer with a 1-D scale (module doc)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]] = {}
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is None or w.dim() != 1 or id(w) not in names:
            continue
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            found[names[id(w)]] = (m, lambda x, m=m: F.layer_norm(x.float(), m.normalized_shape, eps=m.eps))
        elif isinstance(m, nn.RMSNorm) and len(m.normalized_shape) == 1:
            found[names[id(w)]] = (m, lambda x, m=m: F.rms_norm(x.float(), m.normalized_shape, eps=m.eps))
        elif hasattr(m, "variance_epsilon") and m._parameters.get("bias") is None:  # HF RMS norm (T5LayerNorm)
            found[names[id(w)]] = (m, lambda x, m=m: x.float() * torch.rsqrt(
                x.float().pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
    return found


#: what a Gram holds (module doc): 1 = sum x x^T / samples, padding counted; 2 = mean over counted positions
GRAMS_VERSION = 2

#: ``positions(key, batch)``: boolean mask over the leading dims of ``key``'s input (its rows that count), or None
Positions = Callable[[str, Any], Tensor | None]


def linear_map_keys(model: nn.Module) -> list[str]:
    """The weight keys of every linear map :func:`input_grams` finds in ``model`` (module doc), parameter order."""
    return list(_linear_maps(model))


class _Stop(Exception):
    """Raised by the hook on ``stop_after``: the rest of the forward is not needed."""


def input_grams(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, Any], Any] = lambda m, b: m(b),
    size: Callable[[Any], int] = lambda b: b.shape[0],
    keys: Collection[str] | None = None,
    progress: bool = False,
    positions: Positions | None = None,
    norm_scales: bool = False,
    stop_after: nn.Module | None = None,
) -> tuple[dict[str, Tensor], int]:
    """``({weight key: (1/P) sum x x^T over the P positions counted for that map}, N)`` over
    ``forward(model, batch)`` for every batch (module doc).

    ``size(batch)`` is the number of samples in a batch (``N`` is their sum; it does not scale the Grams); for
    ``(images, labels)`` batches pass ``forward=lambda m, b: m(b[0])`` and ``size=lambda b: len(b[0])``.
    ``positions(key, batch)`` marks the rows of ``key``'s input that count: a boolean tensor of the input's
    shape without its last dimension (e.g. ``[B, L]`` for a ``[B, L, in]`` input), or None for all of them;
    without ``positions`` every row counts.  ``keys`` restricts the weights (default: every linear map found,
    see the module docstring); a linear map the forward never reaches gets no Gram (an error when ``keys``
    asked for it), a map reached with no position counted is an error.  ``stop_after``: a submodule after whose
    forward each batch's forward is cut short (what comes after it is not needed: RegMean++ asks for one
    transformer block's maps, fusion_bench/merging/regmean_pp.py); every map of ``keys`` must be reached by then.
    The model runs under ``torch.no_grad`` in eval mode; hooks are removed and training flags restored
    afterwards, also on error.
    ``norm_scales``: also ``{scale key: mean of x_hat * x_hat}`` for every normalisation layer (module doc), over
    the positions ``positions(scale key, batch)`` marks; ``keys`` restricts these too.
    """
    targets = _linear_maps(model)
    scales = _norm_scales(model) if norm_scales else {}
    if keys is not None:
        unknown = [k for k in keys if k not in targets and k not in scales]
        if unknown:
            raise ValueError(
                f"input_grams: key {unknown[0]!r} is not the weight of a linear map of the model "
                f"(e.g. {list(targets)[:3]}){' nor a normalisation scale' if norm_scales else ''}; check the "
                f"names in `keys`"
            )
        targets = {k: targets[k] for k in targets if k in set(keys)}
        scales = {k: scales[k] for k in scales if k in set(keys)}
    key_of = {(id(m), role): k for k, (m, role) in targets.items()}
    grams: dict[str, Tensor] = {}
    counted: dict[str, int] = {}
    batch: list[Any] = [None]  # the batch being run, for `positions`

    def counted_rows(key: str, x: Tensor) -> Tensor:
        """The rows of ``x`` (flattened to [-1, in]) that count for ``key``."""
        x = x.detach()
        mask = positions(key, batch[0]) if positions is not None else None
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]) or mask.dtype != torch.bool:
                raise ValueError(
                    f"input_grams: positions({key!r}, batch) gave a {mask.dtype} mask of shape "
                    f"{tuple(mask.shape)}, but the map's input is {tuple(x.shape)}: it must be a bool "
                    f"tensor of shape {tuple(x.shape[:-1])} (which sequence does {key!r} read?)"
                )
            x = x[mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def add(key: str | None, x: Tensor) -> None:
        if key is None:
            return
        x = counted_rows(key, x).float()
        counted[key] = counted.get(key, 0) + x.shape[0]
        if key in grams:
            grams[key].addmm_(x.T, x)
        else:
            grams[key] = x.T @ x

    scale_of = {id(m): (k, normalise) for k, (m, normalise) in scales.items()}

    def scale_hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        key, normalise = scale_of[id(m)]
        x = counted_rows(key, normalise(args[0] if args else next(iter(kwargs.values())))).float()
        counted[key] = counted.get(key, 0) + x.shape[0]
        sq = x.square().sum(0)
        grams[key] = grams[key].add_(sq) if key in grams else sq

    def linear_hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        add(key_of[(id(m), "linear")], args[0] if args else kwargs["input"])

    def in_proj_hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        add(key_of[(id(m), "in_proj_weight")], args[0] if args else kwargs["x"])

    def mha_hook(m: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
        a = MHA_SIGNATURE.bind(m, *args, **kwargs).arguments
        q, k, v = a["query"], a["key"], a["value"]
        if (key := key_of.get((id(m), "in_proj_weight"))) is not None:
            if not (q is k is v or (torch.equal(q, k) and torch.equal(q, v))):
                raise NotImplementedError(
                    f"input_grams: {key!r}: key/value differ from the query (cross-attention); one Gram "
                    "cannot describe the packed in_proj_weight; pass `keys` without it"
                )
            add(key, q)
        for role, x in (("q_proj_weight", q), ("k_proj_weight", k), ("v_proj_weight", v)):
            add(key_of.get((id(m), role)), x)
        if (key := key_of.get((id(m), "out_proj"))) is not None:
            add(key, mha_out_proj_input(m, *args, **kwargs))

    saved: dict[int, tuple[nn.Module, nn.Parameter]] = {}

    def proj_pre_hook(m: nn.Module, args: tuple) -> None:
        saved[id(m)] = (m, m._parameters["proj"])
        m._parameters["proj"] = None  # the forward skips `pooled @ self.proj`; proj_hook applies it

    def proj_hook(m: nn.Module, args: tuple, output: Any) -> Any:
        proj = saved.pop(id(m))[1]
        m._parameters["proj"] = proj
        pooled = output[0] if isinstance(output, tuple) else output
        add(key_of[(id(m), "proj")], pooled)
        return (pooled @ proj, *output[1:]) if isinstance(output, tuple) else pooled @ proj

    handles, hooked_mha, n = [], set(), 0
    try:
        for m, role in targets.values():
            if isinstance(m, nn.MultiheadAttention):
                if id(m) not in hooked_mha:
                    hooked_mha.add(id(m))
                    handles.append(m.register_forward_hook(mha_hook, with_kwargs=True))
            elif role == "linear":
                handles.append(m.register_forward_pre_hook(linear_hook, with_kwargs=True))
            elif role == "in_proj_weight":
                handles.append(m.register_forward_pre_hook(in_proj_hook, with_kwargs=True))
            else:  # proj
                handles.append(m.register_forward_pre_hook(proj_pre_hook))
                handles.append(m.register_forward_hook(proj_hook))
        for m, _ in scales.values():
            handles.append(m.register_forward_pre_hook(scale_hook, with_kwargs=True))
        if stop_after is not None:  # registered last: the module's own hooks (if any) run before it

            def stop_hook(m: nn.Module, args: tuple, output: Any) -> None:
                raise _Stop

            handles.append(stop_after.register_forward_hook(stop_hook))
        with eval_mode(model), torch.no_grad():
            for b in track(batches, description="input Grams", transient=True, disable=not progress):
                batch[0] = b
                try:
                    forward(model, b)
                except _Stop:
                    pass
                n += int(size(b))
    finally:
        for h in handles:
            h.remove()
        for m, proj in saved.values():  # a forward that raised between the two proj hooks
            m._parameters["proj"] = proj
    if n <= 0:
        raise ValueError("input_grams: `batches` held no samples (N = 0)")
    missing = [k for k in (*targets, *scales) if k not in grams]
    if missing and keys is not None:
        raise ValueError(
            f"input_grams: the forward never reached the linear map of {missing[0]!r} (in `keys`)"
        )
    if missing:
        log.info("input_grams: %d linear maps not reached by the forward get no Gram", len(missing))
    empty = [k for k in (*targets, *scales) if counted.get(k, -1) == 0]
    if empty:
        raise ValueError(
            f"input_grams: `positions` counted no position of the input of {empty[0]!r} in any batch; "
            "its Gram would be 0/0 (check the masks, e.g. all-padding batches)"
        )
    return {k: grams[k].div_(counted[k]) for k in (*targets, *scales) if k in grams}, n
