"""A new model family inherits no other family's behaviour: what it does not declare is refused, by name."""

import types

import pytest
from omegaconf import OmegaConf

from fusion_bench.errors import ConfigError
from fusion_bench.families import FAMILIES, family_class
from fusion_bench.families.base import ANALYSES, ModelFamily, validate_common

MODES = types.SimpleNamespace(build_mode_model=None, trainable_state=None, to_merge_space=None, eval_model=None)


class Minimal(ModelFamily):
    """The least a family declares: its fine-tuning modes (and validate / the abstract members it uses)."""

    modes = MODES

    @classmethod
    def validate(cls, cfg):
        validate_common(cfg, ["a", "b"], cls.analyses)


def _cfg(**kw):
    return OmegaConf.create({"stage": "all", "taskpool": {"tasks": ["a", "b"], "name": "p"},
                             "model": {"name": "m"}, "trainer": {"accelerator": "cpu"}, **kw})


def test_a_family_without_modes_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match="NoModes declares no fine-tuning modes"):
        type("NoModes", (ModelFamily,), {})
    with pytest.raises(TypeError, match=r"names unknown analyses \['saliency'\]"):
        type("Odd", (ModelFamily,), {"modes": MODES, "analyses": ("cosine", "saliency")})


def test_a_minimal_family_offers_only_what_every_family_can():
    fam = Minimal(_cfg())
    assert fam.modes is MODES and not Minimal.fast_search and Minimal.output_formats == ("safetensors",)
    assert Minimal.analyses == ("cosine", "num_tasks")
    refusals = {
        "has no one-pass coefficient grid": lambda: fam.grid_accuracies(None, ["a"], "val"),
        "gives no batches": lambda: fam.batches("a", "train", 4, 0, 2),
        "computes no Gram matrices": lambda: fam.grams(None, []),
        "computes no Fisher information": lambda: fam.fisher(None, "a", [], "sample", 0, []),
        "has no loss for LoraHub": lambda: fam.loss(None, "a", None),
        "has no differentiable classifier for AdaMerging": lambda: fam.logits_at(None, {}, "a", None),
        "writes no output.format=open_clip": lambda: fam.write_merged({}, "open_clip", None),
    }
    for message, call in refusals.items():
        with pytest.raises(NotImplementedError, match=f"Minimal {message}"):
            call()
    assert fam.imported("a") is None and fam.pop_trained_head("a") is None and fam.key_extras("a") == {}


@pytest.mark.parametrize("kind", [k for k in ANALYSES if k not in ("cosine", "num_tasks")])
def test_the_image_classifier_analyses_are_refused_by_name(kind):
    with pytest.raises(ConfigError, match=f"analysis={kind} is not available for model=m: use analysis=cosine or "
                                          f"analysis=num_tasks"):
        Minimal.validate(_cfg(stage="analyze", analysis={"kind": kind}))
    Minimal.validate(_cfg(stage="analyze", analysis={"kind": "cosine"}))


def test_clip_declares_its_own_capabilities_and_t5_its_own():
    clip, t5 = family_class("clip"), family_class("t5")
    assert set(FAMILIES) == {"clip", "t5"}
    assert clip.fast_search and set(clip.analyses) == set(ANALYSES) and "open_clip" in clip.output_formats
    assert not t5.fast_search and t5.analyses == ("cosine", "num_tasks") and "open_clip" not in t5.output_formats
    assert clip.modes is not t5.modes
