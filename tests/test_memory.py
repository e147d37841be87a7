"""Host memory: encoder-sized copies held during a coefficient search, fine-tunes read lazily from the store, and
the text tower freed once the zero-shot heads exist (so the copies do not come back)."""

import gc

import pytest
import torch

from fusion_bench.families import build_family
from fusion_bench.stages.evaluate import grid_accuracies
from fusion_bench.stages.finetune import ensure_finetuned, finetuned_state
from fusion_bench.stages.merge import Method

POOL = ["taskpool.tasks=[shapes,colors,position]", "model.eval_batch_size=64"]


def _live_copies(probe: torch.Tensor, per_copy: int) -> float:
    """Distinct storages alive holding a tensor of the probe's shape and dtype, over how many one encoder has."""
    gc.collect()
    ptrs = set()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.shape == probe.shape and obj.dtype == probe.dtype:
                ptrs.add(obj.untyped_storage().data_ptr())
        except ReferenceError:
            continue
    return len(ptrs) / per_copy


def _stored_fakes(fam, scale=0.3):
    g = torch.Generator().manual_seed(7)
    for t in fam.tasks:
        state = {k: v + scale * v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g)
                 for k, v in fam.pretrained_trainable.items()}
        fam.store.save(fam.checkpoint(t), state, {"task": t, "pretrained": fam.fingerprint})


def _with_fakes(make_cfg, *overrides):
    """A family with stored fake fine-tunes, its method, the lazy fine-tunes, and the probe: the largest weight's
    key and tensor, and how many of the encoder's parameters share its shape (one encoder copy's worth)."""
    fam = build_family(make_cfg(*POOL, *overrides))
    _stored_fakes(fam)
    key = max(fam.pretrained_state, key=lambda k: fam.pretrained_state[k].numel())
    probe = fam.pretrained_state[key]
    per_copy = sum(p.shape == probe.shape for p in fam.encoder.parameters())
    return (fam, Method(fam.cfg.method, fam.mode), [finetuned_state(fam, t) for t in fam.tasks], key, probe,
            per_copy)


def test_search_holds_a_fixed_number_of_encoder_copies(make_cfg, monkeypatch):
    """The encoder, theta_0 (its views), tau_m and one evaluation encoder: 3 copies of the largest weight during
    the search, whatever the number of tasks and grid points; the fine-tunes stay on disk."""
    fam, method, fts, key, probe, per_copy = _with_fakes(make_cfg)
    assert _live_copies(probe, per_copy) == 1  # lazy fine-tunes, theta_0 as views: only the encoder's weights
    seen = []
    from fusion_bench.evaluation import search

    real = search.CoefficientGrid.logits

    def logits(grid, x, head):  # counted on the first batches (a count walks every Python object: slow)
        if len(seen) < 4:
            seen.append(_live_copies(probe, per_copy))
        return real(grid, x, head)

    monkeypatch.setattr(search.CoefficientGrid, "logits", logits)
    writing = []  # while theta(c) is written into the evaluation encoder: one tensor more, not a fourth copy
    real_get = search._Line.__getitem__

    def get(line, k):
        v = real_get(line, k)
        if k == key and len(writing) < 6:  # the temporary of the largest weight's shape is alive now
            writing.append(_live_copies(probe, per_copy))
        return v

    monkeypatch.setattr(search._Line, "__getitem__", get)
    grid_accuracies(fam, method, fts, [0.0, 0.5, 1.0], "val")
    assert seen and max(seen) == 3, seen
    assert writing and max(writing) <= 3 + 1 / per_copy, max(writing)


def test_adamerging_holds_each_task_vector_once(make_cfg, monkeypatch, tmp_path):
    """Learning coefficients keeps theta_0, T task vectors, one evaluation encoder and the weights of the step:
    T + 3 copies of the largest weight at every step, not the fine-tunes and their task vectors both."""
    from fusion_bench.stages.coefficients import coefficient_cfg, learn

    fam, method, fts, _, probe, per_copy = _with_fakes(make_cfg, "method=adamerging", "method.coefficients.steps=2",
                                                       "method.coefficients.batch_size=4")
    seen = []
    real = type(fam).logits_at
    monkeypatch.setattr(type(fam), "logits_at",
                        lambda self, *a: seen.append(_live_copies(probe, per_copy)) or real(self, *a))
    _, info = learn.learn(fam, method, coefficient_cfg(fam.cfg), fts, list(fam.tasks), tmp_path)
    assert info["steps"] == 2 and info["batches_per_task"] == 2 and len(seen) == 2 * 2 * len(fam.tasks)
    assert max(seen) <= len(fam.tasks) + 3, seen


def test_text_tower_is_freed_once_the_heads_exist(make_cfg):
    fam = build_family(make_cfg(*POOL))
    heads = {t: fam.head(t) for t in fam.tasks}
    assert all(h.shape[0] == fam.tasks[t].num_classes for t, h in heads.items())
    assert _clips_alive() == []  # no CLIP (with its text tower) is alive, only the image encoder


def _clips_alive() -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.nn.Module) and hasattr(o, "token_embedding")]


def test_text_tower_is_gone_before_an_evaluation_copy_exists(make_cfg):
    """An evaluation encoder (the search's, a merge's) is never made while the whole CLIP is still loaded."""
    fam = build_family(make_cfg(*POOL))
    fam.encoder  # noqa: B018 (loads the whole CLIP)
    assert len(_clips_alive()) == 1
    copy = fam.model_with(fam.pretrained_state)
    assert _clips_alive() == []  # the heads were made first, and the text tower let go
    assert copy is not fam.encoder and all(fam.zero_shot_head(t).shape[0] == fam.tasks[t].num_classes
                                           for t in fam.tasks)


def test_parked_weights_free_their_memory_and_come_back_bit_for_bit(tmp_path):
    from fusion_bench.models.offload import parked

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    net.register_buffer("scale", torch.randn(4))
    keep = torch.nn.Linear(16, 4)
    keep.weight = net[2].weight  # shared with a module that goes on working: stays in memory
    before = {k: v.clone() for k, v in net.state_dict().items()}
    view = net[0].weight[:3]  # a view of a parked weight (as the family's theta_0 views are)
    with parked(net, tmp_path, keep=keep) as freed:
        assert freed == sum(v.numel() * 4 for k, v in before.items() if k != "2.weight")
        assert net[0].weight.untyped_storage().nbytes() == 0 and net.scale.untyped_storage().nbytes() == 0
        assert torch.equal(keep.weight, before["2.weight"])
        assert (tmp_path / "parked.safetensors").is_file()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(view, before["0.weight"][:3]) and not (tmp_path / "parked.safetensors").exists()
    with pytest.raises(RuntimeError, match="training failed"), parked(net, tmp_path):
        raise RuntimeError("training failed")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # restored on an error too


def test_pretrained_encoder_takes_no_memory_while_its_copy_trains(make_cfg, monkeypatch):
    """During a fine-tune only the training copy holds weights; theta_0 is back, bit for bit, for the next task."""
    fam = build_family(make_cfg("taskpool.tasks=[shapes,colors]", "model.train.steps=2", "model.train.batch_size=8",
                                "model.train.warmup_steps=1"))
    before = {k: v.clone() for k, v in fam.encoder.state_dict().items()}
    held, real_train = [], type(fam).train

    def train(self, task, module, work_dir):
        held.append(sum(p.untyped_storage().nbytes() for p in self.encoder.parameters()))
        return real_train(self, task, module, work_dir)

    monkeypatch.setattr(type(fam), "train", train)
    for t in fam.tasks:
        ensure_finetuned(fam, t)
    assert held == [0, 0]
    assert all(torch.equal(v, before[k]) for k, v in fam.encoder.state_dict().items())
