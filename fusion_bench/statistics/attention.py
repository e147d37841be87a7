"""The input of ``nn.MultiheadAttention.out_proj``, which MHA applies through its weight (no module call)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean masks (True = masked out) as additive float masks, as ``nn.MultiheadAttention`` does."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def mha_out_proj_input(mha: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Tensor:
    """The input of ``mha.out_proj`` in the call ``mha(*args, **kwargs)`` (eval mode), shaped like the query.

    Follows ``F.multi_head_attention_forward`` step by step: in-projection, heads, boolean / float
    ``attn_mask`` and ``key_padding_mask``, ``need_weights=True`` (explicit softmax) or ``False`` (scaled
    dot product attention), ``batch_first`` both ways, unbatched input.  No dropout (eval mode).
    """
    a = MHA_SIGNATURE.bind(mha, *args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError("mha_out_proj_input: add_bias_kv / add_zero_attn are not supported")
    if a["is_causal"] and a["attn_mask"] is None:
        raise RuntimeError("mha_out_proj_input: is_causal needs attn_mask (as in nn.MultiheadAttention)")
    batched = query.dim() == 3
    if batched and mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    kpm = a["key_padding_mask"]
    if not batched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        kpm = None if kpm is None else kpm.unsqueeze(0)
    attn_mask, kpm = _float_mask(a["attn_mask"], query.dtype), _float_mask(kpm, query.dtype)
    L, B, E = query.shape
    S, H = key.shape[0], mha.num_heads
    hd = E // H
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(L, B * H, hd).transpose(0, 1)
    k = F.linear(key, w_k, b_k).view(S, B * H, hd).transpose(0, 1)
    v = F.linear(value, w_v, b_v).view(S, B * H, hd).transpose(0, 1)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S).expand(-1, H, -1, -1).reshape(B * H, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    if a["need_weights"]:
        q = q * math.sqrt(1.0 / float(hd))
        scores = torch.bmm(q, k.transpose(-2, -1)) if attn_mask is None else torch.baddbmm(attn_mask, q, k.mT)
        out = torch.bmm(torch.softmax(scores, dim=-1), v).transpose(0, 1)  # [L, B*H, hd]
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(B, H, -1, S)
        q, k, v = (t.reshape(B, H, -1, hd) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask).permute(2, 0, 1, 3)  # [L, B, H, hd]
    out = out.reshape(L, B, E)
    if not batched:
        return out.squeeze(1)
    return out.transpose(0, 1) if mha.batch_first else out
