"""Model families: `model.family` in a model config names one of FAMILIES, or gives `package.module:Class`
directly, so a new family is a new file (a ModelFamily subclass) and a model config, not an edit of the pipeline."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from fusion_bench.families.base import ModelFamily

FAMILIES = {
    "clip": "fusion_bench.families.clip:CLIPFamily",
    "t5": "fusion_bench.t5.family:T5Family",
}


def family_class(name: str) -> type[ModelFamily]:
    target = FAMILIES.get(name, name)
    if ":" not in target:
        raise ValueError(f"model.family={name!r}: expected one of {sorted(FAMILIES)} or 'package.module:Class'")
    module, cls = target.split(":")
    family = getattr(importlib.import_module(module), cls)
    if not (isinstance(family, type) and issubclass(family, ModelFamily)):
        raise TypeError(f"model.family={name!r} is {family!r}, not a fusion_bench.families.base.ModelFamily")
    return family


def build_family(cfg: DictConfig, validate: bool = True) -> ModelFamily:
    """The configured model family over `cfg`, its config checked first."""
    family = family_class(str(cfg.model.get("family", "clip")))
    if validate:
        family.validate(cfg)
        if cfg.stage in ("merge", "all"):  # the stages that write the merged model (fusion_bench.export)
            from fusion_bench.export import check_output

            check_output(family, cfg)
    return family(cfg)
