"""Model families: `model.family` in a model config names one of FAMILIES, or gives `package.module:Class`
directly, so a new family is a new file (a ModelFamily subclass) and a model config, not an edit of the pipeline."""

from __future__ import annotations

import importlib
import logging

from omegaconf import DictConfig

from fusion_bench.errors import ConfigError
from fusion_bench.families.base import ModelFamily
from fusion_bench.validation.check import check_options

log = logging.getLogger(__name__)

FAMILIES = {
    "clip": "fusion_bench.clip.family:CLIPFamily",
    "t5": "fusion_bench.t5.family:T5Family",
}


def family_class(name: str) -> type[ModelFamily]:
    target = FAMILIES.get(name, name)
    if ":" not in target:
        raise ConfigError(f"model.family={name!r}: must be one of {sorted(FAMILIES)} or 'package.module:Class'")
    module, cls = target.split(":")
    try:
        family = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.family={name!r}: no such class ({e})") from e
    if not (isinstance(family, type) and issubclass(family, ModelFamily)):
        raise ConfigError(f"model.family={name!r} is {family!r}, not a fusion_bench.families.base.ModelFamily")
    return family


def build_family(cfg: DictConfig, validate: bool = True) -> ModelFamily:
    """The configured model family over `cfg`, its options' types and ranges and the family's own checks done first
    unless the caller has done that already (pipeline.run does the whole pass: fusion_bench.pipeline.validate_config)."""
    family = family_class(str(cfg.model.get("family", "clip")))
    if validate:
        for warning in check_options(cfg):
            log.warning(warning)
        family.validate(cfg)
    return family(cfg)
