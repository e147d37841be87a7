"""Helpers shared by the merging tests (imported as `helpers`: pytest puts tests/ on sys.path)."""

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
