"""Flan-T5 weights and tokenizer from local folders, a logits wrapper the fine-tuning modes can transform,
and greedy decoding.

Where the weights come from (`resolve_t5`), first match wins; nothing is ever downloaded:

0. model=tiny_t5 with `model.pretrained` null: the committed tiny T5 (`TINY_T5`: fusion_bench/assets/tiny_t5.safetensors
   + tiny_t5.json, its config and word-level vocabulary), made by `python -m fusion_bench.t5.tiny_pretrain`
   (`make tiny-t5-pretrain`). `model.pretrained=/path/x.safetensors` next to an `x.json` is read the same way.
1. `model.pretrained=/path`: a `save_pretrained` folder (config.json + model.safetensors / pytorch_model.bin +
   tokenizer.json or spiece.model), or a hub-cache repo folder `models--google--flan-t5-base`.
2. `paths.cache_dir` (the model YAML's `cache_dir`) in the Hugging Face hub cache layout:
   `<cache_dir>/models--google--flan-t5-base/snapshots/<revision>/` (also under `<cache_dir>/hub/`).
3. The default Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).

The snapshot named by `refs/main` wins, else the newest. Models and tokenizers load with `local_files_only=True`;
nothing found raises `WeightsNotFoundError` listing every place looked.

The tokenizer is the folder's `tokenizer.json` (read by the `tokenizers` library; `sentencepiece` is only needed
for folders that have nothing but `spiece.model`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from fusion_bench.devices import eval_mode
from fusion_bench.errors import WeightsNotFoundError
from fusion_bench.models.linearize import MountedModule

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_T5 = ASSETS / "tiny_t5.safetensors"  # + tiny_t5.json (fusion_bench/t5/tiny_pretrain.py)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _hub_default() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def _snapshot(repo: Path) -> Path | None:
    """The snapshot of a hub-cache repo folder: refs/main's revision, else the newest complete one."""
    ref = repo / "refs" / "main"
    if ref.is_file() and _is_model_dir(repo / "snapshots" / ref.read_text().strip()):
        return repo / "snapshots" / ref.read_text().strip()
    snaps = [s for s in (repo / "snapshots").glob("*") if _is_model_dir(s)]
    return max(snaps, key=lambda s: s.stat().st_mtime) if snaps else None


def _is_tiny_file(p: Path) -> bool:
    return p.suffix == ".safetensors" and p.is_file() and p.with_suffix(".json").is_file()


def resolve_t5(model_cfg: DictConfig) -> Path:
    looked: list[str] = []
    explicit = model_cfg.get("pretrained")
    if not explicit and model_cfg.get("name") == "tiny_t5":
        if not _is_tiny_file(TINY_T5):
            raise WeightsNotFoundError(f"model=tiny_t5: the committed {TINY_T5} (and {TINY_T5.with_suffix('.json')}) "
                                       f"is missing; re-create it with `make tiny-t5-pretrain`")
        return TINY_T5
    if explicit:
        p = Path(str(explicit)).expanduser()
        if _is_tiny_file(p) or _is_model_dir(p):
            return p
        snap = _snapshot(p) if (p / "snapshots").is_dir() else None
        if snap:
            return snap
        raise WeightsNotFoundError(
            f"model.pretrained={p}: no T5 model there (expected config.json and one of {WEIGHT_FILES}, as written by "
            f"save_pretrained, a hub-cache folder models--<org>--<name>/snapshots/<rev>/, or a tiny T5's "
            f"x.safetensors beside its x.json)")
    hf_id = model_cfg.get("hf_id")
    if hf_id:
        repo = "models--" + str(hf_id).replace("/", "--")
        roots = [Path(str(model_cfg.cache_dir)).expanduser()] if model_cfg.get("cache_dir") else []
        roots = [*roots, *(r / "hub" for r in roots), _hub_default()]
        for root in roots:
            looked.append(str(root / repo / "snapshots" / "*"))
            snap = _snapshot(root / repo)
            if snap:
                return snap
    raise WeightsNotFoundError(
        f"no local weights for model {model_cfg.name} ({hf_id or 'no hf_id'}); looked in: "
        + ("; ".join(looked) or "nowhere (model.pretrained is not set)")
        + f". Provide them with model.pretrained=/path/to/folder (a save_pretrained folder: "
        f"T5ForConditionalGeneration.from_pretrained('{hf_id}').save_pretrained(path) plus its tokenizer, on a "
        f"machine with internet), or put the Hugging Face hub cache (huggingface-cli download {hf_id} "
        f"--cache-dir DIR) under paths.cache_dir=DIR. Nothing is downloaded.")


def load_t5(model_cfg: DictConfig):
    """(T5ForConditionalGeneration in fp32, eval mode; its tokenizer) from local files only."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    path = resolve_t5(model_cfg)
    if path.is_file():  # a tiny T5: weights + its JSON
        model, tokenizer = load_tiny_t5(path)
        log.info("loaded %s from %s", model_cfg.name, path)
        return model, tokenizer
    model = T5ForConditionalGeneration.from_pretrained(str(path), local_files_only=True).float().eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        raise WeightsNotFoundError(
            f"{path}: cannot load the tokenizer ({e}). The folder needs tokenizer.json (or spiece.model with the "
            f"sentencepiece package installed), e.g. AutoTokenizer.from_pretrained(...).save_pretrained(path)") from e
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"{path}: tokenizer has {len(tokenizer)} tokens, model only {model.config.vocab_size}")
    log.info("loaded %s from %s", model_cfg.name, path)
    return model, tokenizer


def tiny_tokenizer(vocab: list, extra_ids: int):
    """The tiny T5's tokenizer: a Unigram model over whole words of its world and single characters (`vocab`:
    [piece, log-probability] pairs; anything else falls back to characters), plus `extra_ids` span sentinels."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=[(str(p), float(s)) for p, s in vocab], extra_ids=int(extra_ids))


def load_tiny_t5(path: str | Path):
    """(T5ForConditionalGeneration in fp32, eval mode; its tokenizer) from a tiny T5's `x.safetensors` (weights,
    possibly fp16) and `x.json` ({"config": T5Config arguments, "tokenizer": {"vocab", "extra_ids"}})."""
    from safetensors.torch import load_model
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    model = T5ForConditionalGeneration(T5Config(**meta["config"])).float()
    load_model(model, str(path), strict=True)  # tied weights (shared, lm_head) are stored once
    return model.eval(), tiny_tokenizer(**meta["tokenizer"])


def save_tiny_t5(model: nn.Module, config: dict, vocab: list, extra_ids: int, path: str | Path,
                 metadata: dict | None = None) -> Path:
    """Write `path` (.safetensors, fp16 weights) and its .json: what `load_tiny_t5` reads."""
    import copy

    from safetensors.torch import save_model

    from fusion_bench.store import atomic_write, atomic_write_text

    path = Path(path)
    half = copy.deepcopy(model).half()
    atomic_write(path, lambda tmp: save_model(half, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))
    meta = {"config": config, "tokenizer": {"vocab": [list(v) for v in vocab], "extra_ids": extra_ids},
            "pretraining": metadata or {}}
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return path


class T5Logits(MountedModule):
    """`T5ForConditionalGeneration` as a function to logits, with the model's own parameter names.

    The fine-tuning modes (fusion_bench.models.modes: LoRA, linearization) need a forward that returns a tensor;
    the model itself stays reachable as `.t5` for `generate`.
    """

    def __init__(self, t5: nn.Module):
        super().__init__(t5)

    @property
    def t5(self) -> nn.Module:
        return self._function_module

    def forward(self, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
        return self.t5(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       use_cache=False, return_dict=True).logits


def decoder_inputs(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher forcing: labels shifted right behind the decoder start token (-100 -> pad)."""
    out = torch.full_like(labels, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return out


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids, attention_mask, start_id: int, eos_id: int, pad_id: int,
                  max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding through any `model(input_ids, attention_mask, decoder_input_ids) -> logits` (no KV cache):
    for models `generate` cannot drive, e.g. a linearized one. Tokens after EOS are pad, like `generate`."""
    out = torch.full((input_ids.shape[0], 1), start_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=out)[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, pad_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if done.all():
            break
    return out


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, sources: list[str], batch_size: int, max_source_length: int,
                   max_new_tokens: int, device: torch.device | str = "cpu",
                   autocast: torch.dtype | None = None) -> list[str]:
    """Greedy generations for `sources`: `generate` (with KV cache) for a plain T5Logits, else `greedy_decode`;
    under `autocast` (the trainer's bf16) when given."""
    device = torch.device(device)
    cfg = model.t5.config if isinstance(model, T5Logits) else None
    texts: list[str] = []
    with eval_mode(model.to(device)):
        for i in range(0, len(sources), batch_size):
            enc = tokenizer(sources[i:i + batch_size], padding=True, truncation=True, max_length=max_source_length,
                            return_tensors="pt").to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                ids = _greedy(model, cfg, enc, max_new_tokens)
            texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [t.strip() for t in texts]


def _greedy(model: nn.Module, cfg, enc, max_new_tokens: int) -> torch.Tensor:
    if isinstance(model, T5Logits):
        return model.t5.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                 num_beams=1, max_new_tokens=max_new_tokens,
                                 decoder_start_token_id=cfg.decoder_start_token_id,
                                 eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    t5cfg = _t5_config(model)
    return greedy_decode(model, enc.input_ids, enc.attention_mask, t5cfg.decoder_start_token_id,
                         t5cfg.eos_token_id, t5cfg.pad_token_id, max_new_tokens)


def _t5_config(model: nn.Module):
    """The T5 config behind a mode wrapper (LoRAEncoder / LinearizedLoRA mount a T5Logits as _function_module)."""
    while not isinstance(model, T5Logits):
        if getattr(model, "_function_module", None) is None:
            raise TypeError(f"{type(model).__name__} does not wrap a T5Logits")
        model = model._function_module
    return model.t5.config
