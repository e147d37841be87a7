"""Merged models written in the formats people load (`output.format`, `output.adapters`; conf/config.yaml).

* `safetensors` (default): `merged.safetensors`, the merged weights in merge space (the names of what the mode
  trains: open_clip image-tower names, T5 names, LoRA adapters): `safetensors.torch.load_file(FILE)`.
* `open_clip` (CLIP): `merged_open_clip.safetensors`, the whole CLIP (merged image tower, the pretrained text
  tower, logit_scale): `open_clip.create_model(arch, pretrained=FILE)`.
* `transformers`: `merged_transformers/`, a `save_pretrained` folder: `CLIPModel` (+ preprocessor_config.json)
  or `T5ForConditionalGeneration` (+ its tokenizer): `CLIPModel.from_pretrained(DIR)` etc.
* `null`: nothing is written (sweeps over real models that only want the numbers: 1.2 GB per ViT-L/14 job).
* `transformers` with `output.adapters=true` (T5, merges of LoRA adapters): `merged_peft_adapter/`,
  adapter_config.json + adapter_model.safetensors: `PeftModel.from_pretrained(pretrained_t5, DIR)`.

LoRA merges are written as full weights with the adapters folded in (W0 + (alpha/r) B A) unless `output.adapters=true`
asks for a peft adapter folder; adapters trained from `finetune.init=compensated` (the l_lora default) run on a base
offset by -(alpha/r) B0 A0, so their adapter folder holds the rank-2r adapter [B, -B0] [A; A0], which gives exactly
the merged model on the unmodified pretrained weights. A task-specific merge (TALL masks, EMR) always writes
`task_specific.safetensors` (fusion_bench.export.task_specific: shared weights, bit-packed masks, rescalers) and, for
the other formats, one model per task under `merged_open_clip/<task>.safetensors` etc.

Every write goes to a temporary name and is renamed into place; an existing output is never overwritten.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fusion_bench.errors import ConfigError

FORMATS = ("safetensors", "open_clip", "transformers")


class OutputError(ConfigError):
    """An `output.*` option this run cannot honour (named in the message, with what to use instead)."""


def output_options(cfg: DictConfig) -> tuple[str | None, bool]:
    """(output.format, output.adapters) with their defaults (safetensors, false); format None: write nothing."""
    out = cfg.get("output") or {}
    fmt = out.get("format", "safetensors")
    return (None if fmt is None else str(fmt)), bool(out.get("adapters", False))


def merges_adapters(finetune_cfg: DictConfig) -> bool:
    return finetune_cfg.mode == "l_lora" or (
        finetune_cfg.mode == "lora" and finetune_cfg.get("task_vector", "delta_w") == "adapters")


def _linearized_method(method_cfg: DictConfig) -> bool:
    from hydra.utils import get_object

    try:
        return bool(getattr(get_object(str(method_cfg._target_)), "evaluate_linearized", False))
    except (ImportError, AttributeError, ValueError):  # a bad _target_: the method stage reports it
        return False


def check_output(family_cls, cfg: DictConfig) -> tuple[str | None, bool]:
    """Stop before anything trains when the run cannot write the output it asks for; returns the options."""
    fmt, adapters = output_options(cfg)
    if fmt is None:
        if adapters:
            raise OutputError("output.adapters=true with output.format=null: nothing is written; set "
                              "output.format=transformers for a peft adapter folder")
        return fmt, adapters
    if fmt not in FORMATS:
        raise OutputError(f"output.format={fmt!r}: expected one of {FORMATS} or null (write nothing)")
    formats = family_cls.output_formats
    if fmt not in formats:
        raise OutputError(f"output.format={fmt}: model={cfg.model.name} ({family_cls.__name__}) is written as one of "
                          f"{formats}")
    mode = cfg.finetune.mode
    if adapters:
        if fmt != "transformers":
            raise OutputError(f"output.adapters=true writes a peft adapter folder: it needs output.format=transformers "
                              f"(got output.format={fmt})")
        if not merges_adapters(cfg.finetune):
            raise OutputError(f"output.adapters=true writes merged LoRA adapters, but finetune={mode} merges full "
                              f"weights: adapters are merged with finetune=l_lora or finetune=lora "
                              f"finetune.task_vector=adapters; or set output.adapters=false")
    if fmt != "safetensors":
        why = None
        if mode == "linear":
            why = "finetune=linear merges are evaluated as linearized models f(x; theta_0) + J (theta - theta_0)"
        elif cfg.get("method") is not None and _linearized_method(cfg.method):
            why = "this method evaluates the merge through the linearized LoRA model"
        if why:
            raise OutputError(f"output.format={fmt}: {why}, which no {fmt} model computes; use "
                              f"output.format=safetensors (the merged weights)")
    family_cls.check_output(cfg, fmt, adapters)
    return fmt, adapters


def output_path(run_dir: Path, fmt: str, adapters: bool, task: str | None = None) -> Path:
    """Where `fmt` is written in the run dir; one per task (`task`) for task-specific merges."""
    if fmt == "safetensors":
        return run_dir / "merged.safetensors"
    if fmt == "open_clip":
        return run_dir / ("merged_open_clip.safetensors" if task is None else f"merged_open_clip/{task}.safetensors")
    base = run_dir / ("merged_peft_adapter" if adapters else "merged_transformers")
    return base if task is None else base / task
