"""Import CLIP checkpoints researchers already have into open_clip key names, saved once as safetensors.

Two sources:

* Hugging Face transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` / `CLIPModel` state dicts
  (`hf_to_open_clip`, or a whole `save_pretrained` folder with `convert_hf_folder`). The conversion is exact:
  q/k/v projections are concatenated into `attn.in_proj_weight` / `in_proj_bias` (the order
  `nn.MultiheadAttention` uses), `visual_projection.weight` / `text_projection.weight` are transposed into
  `visual.proj` / `text_projection`, the rest is a renaming. Vision keys come out as `visual.*` (the names inside
  a full open_clip `CLIP`), text keys as the top-level CLIP names. A plain `CLIPVisionModel` has no projection:
  its output lacks `visual.proj` (take it from the pretrained model).

* The original task-vectors checkpoints (`torch.save(image_encoder)`: whole pickled modules of an old open_clip).
  Unpickling runs code chosen by whoever wrote the file, so `import_task_vectors_pickle` refuses unless called
  with `allow_unsafe_pickle=True`. Even then it never imports the pickled classes: every class reference becomes an
  inert stub, only tensor-rebuilding functions of torch (and OrderedDict / set) are real, and the tensors are read
  out of the stubs' `_parameters` / `_buffers` (non-persistent buffers left out).

CLI:
    python -m fusion_bench.clip.hf_import HF_FOLDER OUT.safetensors
    python -m fusion_bench.clip.hf_import TASK_VECTORS.pt OUT.safetensors --allow-unsafe-pickle
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_VISION = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_TEXT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = re.compile(r"self_attn\.([qkv])_proj$")


class UnsafePickleRefused(PermissionError):
    pass


_FLAT_VISION = "embeddings.patch_embedding.weight"  # transformers >= 5 saves CLIPVisionModel without `vision_model.`


def is_hf_clip_state(state) -> bool:
    return _FLAT_VISION in state or any(k.startswith(("vision_model.", "text_model.")) for k in state)


def hf_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP(Vision)Model state dict -> open_clip CLIP key names (vision under `visual.`). Reads the
    CLIPVisionModel layouts of transformers 4 (`vision_model.embeddings...`) and 5 (`embeddings...`)."""
    if _FLAT_VISION in state:
        state = {f"vision_model.{k}": v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer of older transformers versions, not a weight
        if key == "visual_projection.weight":
            out["visual.proj"] = value.T.contiguous()
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        if key == "logit_scale":
            out["logit_scale"] = value.reshape(())
            continue
        tower, _, rest = key.partition(".")
        if tower not in ("vision_model", "text_model"):
            unknown.append(key)
            continue
        prefix = "visual." if tower == "vision_model" else ""
        named = (_VISION if tower == "vision_model" else _TEXT).get(rest)
        if named is not None:
            out[prefix + named] = value
            continue
        m = _LAYER.match(rest)
        if m is None:
            unknown.append(key)
            continue
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        block = f"{prefix}transformer.resblocks.{layer}."
        q = _QKV.match(module)
        if q is not None:
            qkv.setdefault((prefix, layer, kind), {})[q.group(1)] = value
        elif module in _BLOCK:
            out[f"{block}{_BLOCK[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a transformers CLIP checkpoint: unknown keys {unknown[:8]} ({len(unknown)} in all)")
    for (prefix, layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} of {prefix or 'text '}tower lacks some of q/k/v_proj.{kind}")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The open_clip architecture (OpenAI QuickGELU family) an open_clip-keyed state dict fits, if recognisable."""
    conv = state.get("visual.conv1.weight")
    if conv is None:
        return None
    width, patch = conv.shape[0], conv.shape[-1]
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    return {(768, 32, 12): "ViT-B-32-quickgelu", (768, 16, 12): "ViT-B-16-quickgelu",
            (1024, 14, 24): "ViT-L-14-quickgelu"}.get((width, patch, layers))


def read_hf_folder(src: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a transformers `save_pretrained` folder (single or sharded safetensors, or .bin)."""
    from safetensors.torch import load_file

    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder written by transformers' save_pretrained")
    cfg = src / "config.json"
    if cfg.is_file():
        config = json.loads(cfg.read_text())
        vision = config.get("vision_config", config)
        act = vision.get("hidden_act")
        if act and act != "quick_gelu":
            log.warning("%s uses hidden_act=%s; open_clip's *-quickgelu architectures use quick_gelu", src, act)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            path = src / name
            return load_file(str(path)) if name.endswith(".safetensors") else _torch_state(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                shard_path = src / shard
                state.update(load_file(str(shard_path)) if shard.endswith(".safetensors") else _torch_state(shard_path))
            return state
    raise FileNotFoundError(
        f"no weights in {src}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json"
    )


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def convert_hf_folder(src: str | Path, out: str | Path) -> Path:
    """transformers folder -> open_clip-keyed safetensors at `out`."""
    from fusion_bench.store import atomic_save_safetensors

    state = hf_to_open_clip(read_hf_folder(src))
    if "visual.conv1.weight" in state and "visual.proj" not in state:
        log.warning("%s has no visual_projection: the output lacks visual.proj (use the pretrained model's)", src)
    meta = {"format": "pt", "keys": "open_clip", "converted_from": "transformers", "source": str(src),
            "arch_guess": guess_arch(state) or "unknown"}
    path = atomic_save_safetensors(state, out, metadata=meta)
    log.info("wrote %d tensors (%s) to %s", len(state), meta["arch_guess"], path)
    return path


# ---- task-vectors pickles -------------------------------------------------------------------------------------------
class _Stub:
    """Stands in for any pickled class; records what it was given and runs nothing."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_stub_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    def __call__(self, *args, **kwargs):  # a stubbed function referenced as a value and called by REDUCE
        return _Stub()


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


_REAL = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),  # protocol-2 pickles name builtins this way
    ("__builtin__", "frozenset"),
    ("torch", "Size"),
    ("torch", "device"),
}


_STUBS: dict[tuple[str, str], type] = {}


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _REAL or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        key = (module, name)
        if key not in _STUBS:
            _STUBS[key] = type(name, (_Stub,), {"_qualname": f"{module}.{name}"})
        return _STUBS[key]


_stub_pickle = types.SimpleNamespace(
    Unpickler=_StubUnpickler,
    load=lambda f, **kw: _StubUnpickler(f, **kw).load(),
    __name__="fusion_bench_stub_pickle",
)


def _tensors(obj, prefix: str = "", out: dict | None = None) -> dict[str, torch.Tensor]:
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}{k}.", out)
    elif isinstance(obj, _Stub):
        state = obj.__dict__
        skip = state.get("_non_persistent_buffers_set") or set()
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            for k, v in (state.get(group) or {}).items():
                if isinstance(v, torch.Tensor) and k not in skip:
                    out[f"{prefix}{k}"] = v.detach()
        for k, v in (state.get("_modules") or {}).items():
            if v is not None:
                _tensors(v, f"{prefix}{k}.", out)
    return out


def import_task_vectors_pickle(src: str | Path, out: str | Path, allow_unsafe_pickle: bool = False) -> Path:
    """A task-vectors checkpoint (a whole pickled `ImageEncoder` / open_clip module) -> open_clip-keyed safetensors.

    The `model.` prefix of task-vectors' ImageEncoder is removed, so an image encoder comes out as `visual.*`.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no such checkpoint: {src}")
    if not allow_unsafe_pickle:
        raise UnsafePickleRefused(
            f"refusing to unpickle {src}: task-vectors checkpoints are whole pickled Python modules, and loading a "
            "pickle can run arbitrary code chosen by whoever wrote the file. If you trust its origin, convert it once "
            "with allow_unsafe_pickle=True (CLI: python -m fusion_bench.clip.hf_import "
            f"{src} OUT.safetensors --allow-unsafe-pickle) and use the safetensors file from then on."
        )
    from fusion_bench.store import atomic_save_safetensors

    try:
        obj = torch.load(src, map_location="cpu", pickle_module=_stub_pickle, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise ValueError(f"{src} could not be read as a torch checkpoint: {e}") from e
    state = _tensors(obj)
    if not state:
        raise ValueError(f"{src} holds no tensors (top-level object: {type(obj).__name__})")
    if all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    state = OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in state.items())
    meta = {"format": "pt", "keys": "open_clip", "converted_from": "task-vectors pickle", "source": str(src),
            "top_level_class": getattr(type(obj), "_qualname", type(obj).__name__),
            "arch_guess": guess_arch(state) or "unknown"}
    path = atomic_save_safetensors(state, out, metadata=meta)
    log.info("converted %s (%s, %d tensors) to %s", src, meta["top_level_class"], len(state), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench.clip.hf_import",
        description="Convert a transformers CLIP save_pretrained folder, or a task-vectors torch pickle "
        "(with --allow-unsafe-pickle), to an open_clip-keyed safetensors file.",
    )
    parser.add_argument("src", help="a transformers save_pretrained folder, or a task-vectors .pt file")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="allow unpickling SRC (only for files you trust)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if Path(args.src).is_dir():
            convert_hf_folder(args.src, args.out)
        else:
            import_task_vectors_pickle(args.src, args.out, allow_unsafe_pickle=args.allow_unsafe_pickle)
    except (UnsafePickleRefused, FileNotFoundError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
