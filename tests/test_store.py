import pytest
import torch

from fusion_bench.store import CheckpointError, CheckpointStore, atomic_save_safetensors, load_safetensors


def test_store_roundtrip_and_key(tmp_path):
    store = CheckpointStore(tmp_path)
    p1 = store.path("m", "standard", "digits", 0, {"lr": 1e-3})
    assert p1 == store.path("m", "standard", "digits", 0, {"lr": 1e-3})
    assert p1 != store.path("m", "standard", "digits", 0, {"lr": 2e-3})
    assert p1 != store.path("m", "standard", "digits", 1, {"lr": 1e-3})
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    store.save(p1, state, {"task": "digits"})
    back = store.load(p1, expected=state)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"], state["b"])


def test_store_refuses_bad_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path)
    p = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        store.load(p)
    store.save(p, {"a": torch.randn(3, 4)}, {})
    with pytest.raises(CheckpointError, match=r"'a' has shape \(3, 4\), model expects \(4, 3\)"):
        store.load(p, expected={"a": torch.zeros(4, 3)})
    with pytest.raises(CheckpointError, match=r"missing \['b'\]"):
        store.load(p, expected={"a": torch.zeros(3, 4), "b": torch.zeros(1)})
    store.save(p, {"a": torch.tensor([1.0, float("nan")])}, {})
    with pytest.raises(CheckpointError, match="'a' contains NaN"):
        store.load(p)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=f"corrupted or truncated checkpoint {p}"):
        load_safetensors(p)


def test_atomic_write_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    atomic_save_safetensors({"a": torch.ones(2)}, p)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("fusion_bench.store.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save_safetensors({"a": torch.zeros(2)}, p)
    assert torch.equal(load_safetensors(p)["a"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
