"""Helpers shared by the merging tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

import torch
from safetensors.torch import save_file

from fusion_bench.merging import LazyStateDict


def save_models(tmp_path, pre, fts):
    """Write pretrained and fine-tuned state dicts as safetensors and open them as LazyStateDicts."""
    save_file(pre, tmp_path / "pretrained.safetensors")
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"task{i}.safetensors")
    return LazyStateDict(tmp_path / "pretrained.safetensors"), [
        LazyStateDict(tmp_path / f"task{i}.safetensors") for i in range(len(fts))
    ]


def tiny_classifier(seed: int = 0, classes: int = 3):
    """A 4 -> 8 -> classes MLP in eval mode (Fisher tests)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes)).eval()


def classification_batches(seed=0, sizes=(5, 4), shape=(4,), classes=3):
    """Seeded (inputs, labels) batches of the given sizes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)) for b in sizes
    ]


def assert_fisher_close(got, want, atol):
    """Same keys, fp32 values, equal to the float64 reference within rtol 1e-4 and ``atol``."""
    import torch

    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=atol, msg=k)


def assert_bad_values_refused_by_name(cfg, options):
    """As tests/test_validation_ranges.py walks every config: each of `options` has a declared range, and the usual
    bad values are refused naming the option (one line), or lie inside that range."""
    import copy
    import math

    from omegaconf import OmegaConf

    from fusion_bench.errors import ConfigError
    from fusion_bench.validation.check import check_options, range_of
    from fusion_bench.validation.ranges import Context

    values = OmegaConf.to_container(cfg, resolve=True)
    ctx = Context(tasks=tuple(values["taskpool"]["tasks"]))
    for option in options:
        rng = range_of(values, option)
        assert rng is not None, option
        for bad in (math.nan, math.inf, -math.inf, 0, -1, -5, 1e12, 2.5, "abc"):
            changed = copy.deepcopy(cfg)
            OmegaConf.update(changed, option, bad, merge=False)
            try:
                check_options(changed)
            except ConfigError as e:
                assert str(e).startswith(f"{option}=") and "\n" not in str(e), e
                continue
            assert bad != "abc" and math.isfinite(bad) and rng.problem(bad, ctx) is None, (option, bad)


def store_fake_finetunes(fam, seed=5):
    """A perturbed copy of the family's trainable weights per task, saved in its store as that task's fine-tune (no
    training); returns them in merge space, in task order."""
    g = torch.Generator().manual_seed(seed)
    fts = []
    for t in fam.tasks:
        state = {k: v + 0.3 * v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g)
                 for k, v in fam.trainable_state(fam.base).items()}
        fam.store.save(fam.checkpoint(t), state, {"task": t, "pretrained": fam.fingerprint})
        fts.append(fam.to_merge_space(state))
    return fts
