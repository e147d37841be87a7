"""The tiny T5 world (issue 35): taskpool=tiny_glue's generated tasks (deterministic, GLUE's formats, label words and
metrics), the committed tiny T5 asset (config, vocabulary, zero-shot at chance), its pretraining command, and
`model=tiny_t5 taskpool=tiny_glue` end to end on two tasks with a few fine-tuning steps."""

import hashlib
import math
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fusion_bench.data import glue, tiny_glue
from fusion_bench.pipeline import run
from fusion_bench.t5.model import TINY_T5, load_t5, resolve_t5

METRICS = {"cola": "matthews", "sst2": "exact_match", "mrpc": "f1", "qqp": "f1", "stsb": "spearman",
           "mnli": "exact_match", "qnli": "exact_match", "rte": "exact_match"}
POOL = OmegaConf.create({"name": "tiny_glue", "source": "tiny_glue", "version": 1, "split_seed": 0})


@pytest.fixture(autouse=True)
def _one_thread():
    """A d_model-64 model on a shared 2-core machine: a second thread only waits."""
    torch.set_num_threads(1)


def _digest(splits) -> str:
    return hashlib.sha256(repr({k: [(e.source, e.target, e.score) for e in v] for k, v in splits.items()})
                          .encode()).hexdigest()


# ---- the tasks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(tiny_glue.TASKS))
def test_tasks_are_deterministic_in_glue_format(task):
    splits = tiny_glue.make_splits(task)
    assert _digest(splits) == _digest(tiny_glue.make_splits(task))  # same seed: the same examples
    assert _digest(splits) != _digest(tiny_glue.make_splits(task, seed=1))
    assert {k: len(v) for k, v in splits.items()} == tiny_glue.SPLIT_SIZES
    sources = [e.source for v in splits.values() for e in v]
    assert len(set(sources)) == len(sources)  # no example twice, nor in two splits
    prefix = glue.TASKS[task].template.split("{")[0]
    words = tiny_glue.label_words(task)
    for split, examples in splits.items():
        assert all(e.source.startswith(prefix) for e in examples), task
        counts = Counter(e.target for e in examples)
        assert set(counts) == set(words), (task, split, counts)  # every label, no other target
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced
        if task == "stsb":
            assert all(e.score == float(e.target) for e in examples)
    loaded = tiny_glue.load_task(POOL, task)
    assert loaded.metric_name == METRICS[task] and loaded.split("test") == splits["test"]
    with pytest.raises(ValueError, match="version"):
        tiny_glue.make_splits(task, version=2)


def test_f1_and_matthews_match_sklearn():
    from sklearn.metrics import f1_score, matthews_corrcoef

    g = torch.Generator().manual_seed(0)
    examples = [glue.Example("s", t) for t in ("equivalent", "not_equivalent")
                for _ in range(int(torch.randint(5, 20, (1,), generator=g)))]
    words = ["equivalent", "not_equivalent", "maybe"]  # anything but the positive word counts as negative
    preds = [words[int(torch.randint(0, 3, (1,), generator=g))] for _ in examples]
    gold = [e.target == "equivalent" for e in examples]
    pos = [p == "equivalent" for p in preds]
    assert glue.score("mrpc", preds, examples, "f1") == pytest.approx(f1_score(gold, pos))
    assert glue.score("mrpc", preds, examples, "matthews") == pytest.approx(matthews_corrcoef(gold, pos))
    assert glue.score("mrpc", ["x"] * len(examples), examples, "f1") == 0.0
    assert glue.score("mrpc", ["equivalent"] * len(examples), examples, "matthews") == 0.0  # undefined -> 0
    assert glue.score("mrpc", preds, examples) == glue.exact_match(preds, [e.target for e in examples])
    with pytest.raises(ValueError, match="binary"):
        glue.score("mnli", ["neutral"], [glue.Example("s", "neutral")], "f1")


# ---- the committed model ----------------------------------------------------------------------------------------
def test_committed_asset_loads_with_its_vocabulary():
    cfg = OmegaConf.create({"name": "tiny_t5", "pretrained": None, "hf_id": None})
    assert resolve_t5(cfg) == TINY_T5
    assert TINY_T5.stat().st_size + TINY_T5.with_suffix(".json").stat().st_size < 2 * 2**20
    model, tok = load_t5(cfg)
    c = model.config
    assert (c.d_model, c.num_layers, c.num_decoder_layers, c.vocab_size) == (64, 2, 2, len(tok))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    sentence = "qnli question: where is the big red dog? sentence: alice has the dog in the park."
    ids = tok(sentence).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    assert len(ids) == len(sentence.split()) + 3  # one token a word (+ '?', '.', EOS)
    for task in tiny_glue.TASKS:  # every word of every task is in the vocabulary; every label word is one token
        texts = [e.source for e in tiny_glue.make_splits(task)["test"]]
        assert tok.unk_token_id not in {i for x in tok(texts).input_ids for i in x}, task
        assert all(len(tok(w).input_ids) == 2 for w in tiny_glue.label_words(task)), task


def test_zero_shot_is_at_chance(make_cfg):
    from fusion_bench.t5.family import T5Family

    fam = T5Family(make_cfg("model=tiny_t5", "taskpool=tiny_glue"))
    for task in tiny_glue.TASKS:
        score = fam.acc(fam.backbone, task, "test")
        labels = len(tiny_glue.label_words(task))
        # accuracy: 1 / labels; Matthews, Spearman: 0; F1 of a random guess: 0.5 (always positive: 0.67)
        top = {"exact_match": 1 / labels + 0.12, "matthews": 0.15, "spearman": 0.25, "f1": 0.67}[METRICS[task]]
        assert -0.25 <= score <= top, (task, score)


# ---- pretraining ------------------------------------------------------------------------------------------------
def test_pretraining_command_is_deterministic(tmp_path):
    from fusion_bench.t5 import tiny_pretrain

    args = ["--steps", "3", "--examples", "96", "--batch-size", "8"]
    one = tiny_pretrain.main([*args, "--out", str(tmp_path / "a" / "tiny")])
    tiny_pretrain.main([*args, "--out", str(tmp_path / "b" / "tiny.safetensors")])
    a, b = (tmp_path / d / "tiny.safetensors" for d in ("a", "b"))
    assert one["out"] == str(a)
    sa, sb = load_file(a), load_file(b)  # (the header's metadata order is not fixed: compare what it holds)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(v.dtype == torch.float16 for v in sa.values())
    assert a.with_suffix(".json").read_text() == b.with_suffix(".json").read_text()
    assert math.isfinite(one["final_loss"])
    model, tok = load_t5(OmegaConf.create({"name": "tiny_t5", "pretrained": str(a)}))  # model.pretrained=FILE
    assert model.config.vocab_size == len(tok) == len(tiny_pretrain.vocabulary()) + tiny_pretrain.EXTRA_IDS


# ---- end to end -------------------------------------------------------------------------------------------------
def test_end_to_end_two_tasks(make_cfg, tmp_path):
    cfg = make_cfg("model=tiny_t5", "taskpool=tiny_glue", "taskpool.tasks=[sst2,rte]", "num_threads=1",
                   f"paths.root={tmp_path}", "model.train.steps=30", "model.train.warmup_steps=3")
    assert cfg.model.train.lr == 1e-3 and cfg.model.train.batch_size == 16  # the pool's recipe
    report = run(cfg, tmp_path / "run", "task_arithmetic")
    assert report["model"] == "tiny_t5" and report["taskpool"] == "tiny_glue"
    assert set(report["tasks"]) == {"sst2", "rte"}
    assert report["metrics"] == {"sst2": "exact_match", "rte": "exact_match"}
    for t, r in report["tasks"].items():
        assert all(math.isfinite(r[k]) and 0 <= r[k] <= 1 for k in ("zeroshot", "finetuned", "merged")), (t, r)
        assert r["normalized"] is None or math.isfinite(r["normalized"])
    assert report["tasks"]["sst2"]["finetuned"] > report["tasks"]["sst2"]["zeroshot"] + 0.2  # 30 steps teach it
    assert (tmp_path / "run" / "report.md").is_file()
