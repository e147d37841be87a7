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
