"""T5 / Flan-T5 on GLUE: the GLUE TSV readers and prompts, metrics, weight resolution, and finetune -> merge ->
evaluate end to end on a tiny random T5 (d_model 32, 2 layers) with a tiny Unigram tokenizer and GLUE-format
fixtures, all written to temporary folders."""

import json
import random
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fusion_bench.data import glue
from fusion_bench.errors import WeightsNotFoundError
from fusion_bench.pipeline import run
from fusion_bench.stages.finetune import MissingFinetuneError
from fusion_bench.store import load_safetensors

WORDS = ["the", "a", "cat", "dog", "man", "woman", "runs", "sleeps", "big", "small", "red", "blue", "house", "car", "tree", "sees", "likes", "is", "was", "not", "and", "what", "who", "why", "question", "answer"]
PROMPT_WORDS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "sentence:", "sentence1:", "sentence2:", "question:", "question1:", "question2:", "hypothesis:", "premise:"]
TARGETS = ["entailment", "not_entailment", "neutral", "contradiction", "acceptable", "unacceptable", "equivalent", "not_equivalent", "duplicate", "not_duplicate", "positive", "negative"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.:,?'_-")


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    """A d_model-32 model on a shared 2-core machine: 2 threads are ~20x slower than 1 (they wait for each other)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A save_pretrained folder: random tiny T5 + tokenizer.json (Unigram over words and characters)."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    path = tmp_path_factory.mktemp("tiny_t5")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in (*WORDS, *PROMPT_WORDS, *TARGETS)]
    vocab += [(c, -5.0) for c in CHARS] + [("▁" + c, -5.0) for c in CHARS]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    # like Flan-T5 (T5 v1.1): an lm_head of its own, and `tie_word_embeddings: false` (transformers 5 forces the
    # config attribute to True but keeps distinct checkpoint tensors untied, and then does not rescale the output)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"]) * 0.2
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return path


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "."


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    """data_root with glue/RTE, glue/STS-B and glue/CoLA in the official TSV layouts (random sentences)."""
    root = tmp_path_factory.mktemp("data_root")
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 12)):
        _write(root / "glue/RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
               [(i, _sentence(rng), _sentence(rng), "entailment" if i % 3 else "not_entailment") for i in range(n)])
        _write(root / "glue/STS-B" / f"{split}.tsv",
               ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
               [(i, "main-captions", "MSRvid", "2012test", i, "none", "none", _sentence(rng), _sentence(rng),
                 f"{rng.uniform(0, 5):.3f}") for i in range(n)])
        _write(root / "glue/CoLA" / f"{split}.tsv", None,
               [("gj04", i % 2, "" if i % 2 else "*", _sentence(rng)) for i in range(n)])
    return root


FAST = ["model=tiny_t5", "taskpool=glue", "taskpool.tasks=[rte,stsb]", "num_threads=1"]


def _cfg(make_cfg, tiny_t5, glue_root, *extra):
    return make_cfg(*FAST, f"model.pretrained={tiny_t5}", f"paths.data_root={glue_root}", *extra)


# ---- GLUE formats and metrics -----------------------------------------------------------------------------------
MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
# task: (file, header (None: headerless), row, expected source, expected target)
ROWS = {
    "cola": ("train.tsv", None, ["gj04", "0", "*", "Him went home ."], "cola sentence: Him went home .",
             "unacceptable"),
    "sst2": ("train.tsv", ["sentence", "label"], ["a gorgeous film ", "1"], "sst2 sentence: a gorgeous film",
             "positive"),
    "mrpc": ("train.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             ["1", "702876", "702977", 'He said "no" .', "He refused ."],
             'mrpc sentence1: He said "no" . sentence2: He refused .', "equivalent"),
    "qqp": ("train.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["1", "3", "4", "How do I cook?", "How to cook rice?", "0"],
            "qqp question1: How do I cook? question2: How to cook rice?", "not_duplicate"),
    "stsb": ("train.tsv", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
             ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane takes off.",
              "An air plane is taking off.", "3.370"],
             "stsb sentence1: A plane takes off. sentence2: An air plane is taking off.", "3.4"),
    "mnli": ("dev_matched.tsv", MNLI_DEV,
             ["0", "63735", "63735n", "slate", "( ( The ...", "( ( ( The ...", "(ROOT ...", "(ROOT ...",
              "The new rights are nice enough", "Everyone really likes the newest benefits", "neutral",
              "entailment", "neutral", "neutral", "neutral", "neutral"],
             "mnli hypothesis: Everyone really likes the newest benefits premise: The new rights are nice enough",
             "neutral"),
    "qnli": ("train.tsv", ["index", "question", "sentence", "label"],
             ["0", "When did it open?", "It opened in 1990.", "entailment"],
             "qnli question: When did it open? sentence: It opened in 1990.", "entailment"),
    "rte": ("train.tsv", ["index", "sentence1", "sentence2", "label"],
            ["0", "No weapons were found.", "Weapons were found.", "not_entailment"],
            "rte sentence1: No weapons were found. sentence2: Weapons were found.", "not_entailment"),
}


@pytest.mark.parametrize("task", sorted(ROWS))
def test_prompt_and_target_of_each_task(task, tmp_path):
    file, header, row, source, target = ROWS[task]
    path = tmp_path / "glue" / glue.TASKS[task].folder / file
    _write(path, header, [row])
    if task == "mrpc":  # the official MRPC files start with a byte order mark
        path.write_bytes("\ufeff".encode() + path.read_bytes())
    split = "dev" if file.startswith("dev") else "train"
    [ex] = glue.read_split(task, tmp_path, split)
    assert (ex.source, ex.target) == (source, target)
    if task == "stsb":
        assert ex.score == pytest.approx(3.37)


def test_mnli_train_layout_and_malformed_rows(tmp_path):
    path = tmp_path / "glue/MNLI/train.tsv"
    row = ["0", "1", "1e", "gov", "(", "(", "(", "(", "Premise here", "Hypothesis here", "contradiction",
           "contradiction"]
    _write(path, MNLI_TRAIN, [row, row[:5]])  # the second row is truncated: skipped
    [ex] = glue.read_split("mnli", tmp_path, "train")
    assert ex.source == "mnli hypothesis: Hypothesis here premise: Premise here" and ex.target == "contradiction"
    _write(path, MNLI_TRAIN, [row[:-1] + ["maybe"]])
    with pytest.raises(ValueError, match=r"train.tsv, line 2: .*unknown label 'maybe'"):
        glue.read_split("mnli", tmp_path, "train")


def test_stsb_rounding_and_parsing():
    # nearest 0.2, ties half to even like tf.round in T5's preprocessing: 4.9 -> 24.5 / 5 -> 4.8, 3.5 -> 3.6
    assert [glue.stsb_target(s) for s in (0.0, 3.37, 3.5, 4.9, 5.0, 0.25)] == ["0.0", "3.4", "3.6", "4.8", "5.0",
                                                                             "0.2"]
    assert glue.parse_score("3.4") == 3.4 and glue.parse_score(" 2") == 2.0
    assert glue.parse_score("about 4.2 or so") == 4.2
    assert glue.parse_score("entailment") == glue.STSB_FALLBACK == 0.0


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    for n, levels in ((50, 1000), (40, 4), (7, 2)):  # with and without ties
        pred = torch.randint(0, levels, (n,), generator=g).float().div(levels / 5).tolist()
        gold = torch.rand(n, generator=g).mul(5).round(decimals=1).tolist()
        assert glue.spearman(pred, gold) == pytest.approx(spearmanr(pred, gold).statistic, abs=1e-12)
    assert glue.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # undefined -> 0
    exs = [glue.Example("s", glue.stsb_target(v), v) for v in (0.5, 2.0, 4.0)]
    assert glue.score("stsb", ["1.0", "oops", "3.8"], exs) == pytest.approx(spearmanr([1, 0, 3.8], [0.5, 2, 4])[0])
    assert glue.exact_match([" Entailment", "neutral"], ["entailment", "contradiction"]) == 0.5


def test_val_carved_from_train(glue_root):
    task = glue.load_glue_task(OmegaConf.create({"data_root": str(glue_root)}), "cola")
    assert (len(task.split("train")), len(task.split("val")), len(task.split("test"))) == (44, 4, 12)
    assert not {e.source for e in task.split("val")} & {e.source for e in task.split("train")}
    assert glue.carve_val(100_000, 0.1, 5000, 0)[1][:3] == glue.carve_val(100_000, 0.1, 5000, 0)[1][:3]
    assert len(glue.carve_val(100_000, 0.1, 5000, 0)[1]) == 5000


def _hub_glue(task: str, splits: dict[str, list[dict]]):
    """A `datasets.DatasetDict` with the columns and features of the Hub's nyu-mll/glue `task`."""
    datasets = pytest.importorskip("datasets")
    text = {"rte": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"), "stsb": ("sentence1", "sentence2")}
    label = (datasets.Value("float32") if task == "stsb"
             else datasets.ClassLabel(names=list(glue.HF_LABELS[task])))
    features = datasets.Features({**{c: datasets.Value("string") for c in text[task]}, "label": label,
                                  "idx": datasets.Value("int32")})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)], features=features)
        for name, rows in splits.items()})


def test_datasets_save_to_disk_copy(tmp_path):
    _hub_glue("rte", {"train": [{"sentence1": "A  b.", "sentence2": "C d.", "label": 1},
                                {"sentence1": "G.", "sentence2": "H.", "label": 0}],
                      "validation": [{"sentence1": "E.", "sentence2": "F.", "label": 0}],
                      "test": [{"sentence1": "X.", "sentence2": "Y.", "label": -1}]}).save_to_disk(tmp_path / "glue/RTE")
    train = glue.read_split("rte", tmp_path, "train")
    assert [(e.source, e.target) for e in train] == [("rte sentence1: A b. sentence2: C d.", "not_entailment"),
                                                     ("rte sentence1: G. sentence2: H.", "entailment")]
    assert [e.target for e in glue.read_split("rte", tmp_path, "dev")] == ["entailment"]


def test_hub_parquet_snapshot(tmp_path):
    """nyu-mll/glue as downloaded from the Hub: glue/<task>/<split>-00000-of-00001.parquet."""
    mnli = _hub_glue("mnli", {"train": [{"premise": "P.", "hypothesis": "H.", "label": 2}],
                              "validation_matched": [{"premise": "Q.", "hypothesis": "I.", "label": 1}],
                              "validation_mismatched": [{"premise": "R.", "hypothesis": "J.", "label": 0}]})
    stsb = _hub_glue("stsb", {"train": [{"sentence1": "a.", "sentence2": "b.", "label": 3.43}],
                              "validation": [{"sentence1": "c.", "sentence2": "d.", "label": 4.9}]})
    for task, dd in (("mnli", mnli), ("stsb", stsb)):
        for name, ds in dd.items():
            ds.to_parquet(str(tmp_path / "glue" / task / f"{name}-00000-of-00001.parquet"))
    assert [(e.source, e.target) for e in glue.read_split("mnli", tmp_path, "train")] == [
        ("mnli hypothesis: H. premise: P.", "contradiction")]
    assert [e.target for e in glue.read_split("mnli", tmp_path, "dev")] == ["neutral"]  # validation_matched
    [ex] = glue.read_split("stsb", tmp_path, "dev")
    assert (ex.source, ex.target, round(ex.score, 2)) == ("stsb sentence1: c. sentence2: d.", "5.0", 4.9)
    (tmp_path / "glue/stsb/validation-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"glue/stsb has the splits \['train'\]; expected 'validation'"):
        glue.read_split("stsb", tmp_path, "dev")


def test_missing_data_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"glue/MNLI/dev_matched.tsv not found.*train.tsv.*paths.data_root"):
        glue.read_split("mnli", tmp_path, "dev")


# ---- weights ----------------------------------------------------------------------------------------------------
def test_missing_weights_say_where_and_how(tmp_path, monkeypatch):
    from fusion_bench.t5.model import resolve_t5

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = OmegaConf.create({"name": "flan_t5_base", "hf_id": "google/flan-t5-base", "pretrained": None,
                            "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(WeightsNotFoundError, match=r"cache/models--google--flan-t5-base/snapshots.*model.pretrained="):
        resolve_t5(cfg)
    cfg.pretrained = str(tmp_path / "nowhere")
    with pytest.raises(WeightsNotFoundError, match="nowhere: no T5 model there"):
        resolve_t5(cfg)


def test_hub_cache_layout(tmp_path, tiny_t5):
    from fusion_bench.t5.model import load_t5

    repo = tmp_path / "cache/models--google--flan-t5-base"
    shutil.copytree(tiny_t5, repo / "snapshots/abc123")
    (repo / "snapshots/old").mkdir()  # an incomplete snapshot is ignored
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("abc123")
    cfg = OmegaConf.create({"name": "flan_t5_base", "hf_id": "google/flan-t5-base", "pretrained": None,
                            "cache_dir": str(tmp_path / "cache")})
    model, tok = load_t5(cfg)
    assert model.config.d_model == 32 and tok("rte sentence1:").input_ids[-1] == model.config.eos_token_id


def test_greedy_decode_equals_generate(tiny_t5):
    from fusion_bench.t5.model import T5Logits, generate_texts, load_t5
    from fusion_bench.t5.modes import build_mode_model, eval_model, trainable_state

    model, tok = load_t5(OmegaConf.create({"name": "tiny", "pretrained": str(tiny_t5)}))
    sources = ["rte sentence1: the cat runs. sentence2: a dog.", "stsb sentence1: red car. sentence2: big tree."]
    plain = T5Logits(model)
    # the same model through a wrapper `generate` cannot drive: our greedy loop without KV cache
    ll = OmegaConf.create({"mode": "l_lora", "r": 4, "alpha": 8, "init": "compensated", "dropout": 0.0,
                           "target_modules": r".*\.(SelfAttention|EncDecAttention)\.(q|v)"})
    lin = eval_model(ll, plain, trainable_state(build_mode_model(ll, plain)), linearized=True)
    a = generate_texts(plain, tok, sources, 8, 64, 6)
    b = generate_texts(lin, tok, sources, 1, 64, 6)
    assert a == b and all(isinstance(t, str) for t in a)


def test_generation_under_bf16_autocast(tiny_t5):
    """trainer=gpu's evaluation precision, on the CPU: every linear layer of the decoder loop computes in bf16."""
    from fusion_bench.t5.model import T5Logits, generate_texts, load_t5

    model, tok = load_t5(OmegaConf.create({"name": "tiny", "pretrained": str(tiny_t5)}))
    dtypes = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    texts = generate_texts(T5Logits(model), tok, ["rte sentence1: a cat. sentence2: a dog."], 4, 64, 4,
                           autocast=torch.bfloat16)
    assert dtypes == {torch.bfloat16} and len(texts) == 1
    dtypes.clear()
    generate_texts(T5Logits(model), tok, ["rte sentence1: a cat. sentence2: a dog."], 4, 64, 4)
    assert dtypes == {torch.float32}


def test_lora_modes_start_at_the_pretrained_model_and_fold_exactly(tiny_t5):
    from fusion_bench.t5.model import T5Logits, load_t5
    from fusion_bench.t5.modes import build_mode_model, eval_model, to_merge_space, trainable_state

    model, tok = load_t5(OmegaConf.create({"name": "tiny", "pretrained": str(tiny_t5)}))
    plain = T5Logits(model)
    enc = tok(["rte sentence1: the cat runs.", "cola sentence: a dog sees."], padding=True, return_tensors="pt")
    x = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
         "decoder_input_ids": torch.tensor([[0, 5]] * 2)}
    with torch.no_grad():
        ref = plain(**x)
    target = r".*\.(SelfAttention|EncDecAttention)\.(q|v)"
    for mode, init in (("lora", "zero_b"), ("lora", "compensated"), ("l_lora", "compensated")):
        cfg = OmegaConf.create({"mode": mode, "r": 4, "alpha": 8, "init": init, "dropout": 0.0,
                                "target_modules": target})
        m = build_mode_model(cfg, plain).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(**x), ref, rtol=0, atol=1e-5, msg=f"{mode} {init} at phi_0")
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        state = trainable_state(m)
        assert all(".lora_" in k for k in state) and len(state) == 24
        if mode == "lora":  # delta-W task vectors: the adapters folded into q and v give the LoRA model exactly
            merge_space = to_merge_space(cfg, plain, state)
            assert len(merge_space) == 12 and all(k.endswith((".q.weight", ".v.weight")) for k in merge_space)
            with torch.no_grad():
                torch.testing.assert_close(eval_model(cfg, plain, merge_space)(**x), m(**x), rtol=0, atol=1e-5)
    with torch.no_grad():  # the backbone itself is never touched
        torch.testing.assert_close(plain(**x), ref, rtol=0, atol=0)


# ---- RegMean's Grams: means over real tokens -------------------------------------------------------------------
def _t5_examples():
    """Examples of very different source / target lengths (3..40 words), in a fixed order."""
    rng = random.Random(3)
    out = []
    for i in range(7):
        n_src, n_tgt = (3, 1) if i % 3 == 0 else (40, 6) if i % 3 == 1 else (12, 3)
        out.append(glue.Example(source="rte sentence1: " + " ".join(rng.choice(WORDS) for _ in range(n_src)),
                                target=" ".join(rng.choice(TARGETS) for _ in range(n_tgt))))
    return out


def _t5_batches(tok, examples, batch_size):
    from fusion_bench.t5.train import Seq2SeqCollator

    collate = Seq2SeqCollator(tok, 128, 16, start_id=0, pad_id=0)
    out = []
    for s in range(0, len(examples), batch_size):
        b = collate(examples[s:s + batch_size])
        out.append(({k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}, b["labels"]))
    return out


def _t5_grams(model, batches):
    from fusion_bench.t5.family import T5Family

    return T5Family.grams(None, model, batches)  # the family's Grams (it reads nothing of the family itself)


def test_t5_grams_are_means_over_every_real_token(tiny_t5):
    """Brute force: every example run alone (no padding at all), the input of every nn.Linear collected,
    sum x x^T over all those tokens / their number; the family's Grams over padded batches give the same."""
    from torch import nn

    from fusion_bench.t5.model import T5Logits, load_t5

    model, tok = load_t5(OmegaConf.create({"name": "tiny", "pretrained": str(tiny_t5)}))
    plain = T5Logits(model)
    examples = _t5_examples()
    batches = _t5_batches(tok, examples, 3)
    enc_lengths = {b[0]["input_ids"].shape[1] for b in batches}
    assert len(enc_lengths) > 1 and any((b[0]["attention_mask"] == 0).any() for b in batches)  # padded
    names = {m: n for n, m in plain.named_modules() if isinstance(m, nn.Linear)}
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: rows.setdefault(names[m] + ".weight", []).append(
        a[0].reshape(-1, a[0].shape[-1]).double())) for m in names]
    try:
        with torch.no_grad():
            for single in _t5_batches(tok, examples, 1):  # one example: no padding anywhere
                assert bool(single[0]["attention_mask"].all()) and bool((single[1] != -100).all())
                plain(**single[0])
    finally:
        for h in hooks:
            h.remove()
    grams = _t5_grams(plain, batches)
    # encoder blocks: 4 attention + 3 gated-FF maps; decoder blocks: 4 self- + 4 cross-attention + 3 FF; lm_head
    assert set(grams) == set(rows) and len(grams) == 2 * (4 + 3) + 2 * (4 + 4 + 3) + 1
    n_enc = sum(len(tok(e.source).input_ids) for e in examples)
    assert sum(len(x) for x in rows["encoder.block.0.layer.0.SelfAttention.q.weight"]) == n_enc
    assert sum(len(x) for x in rows["decoder.block.1.layer.1.EncDecAttention.k.weight"]) == n_enc
    for key, xs in rows.items():
        x = torch.cat(xs)
        torch.testing.assert_close(grams[key].double(), x.T @ x / len(x), rtol=1e-4, atol=1e-6, msg=key)


def test_regmean_on_t5_does_not_depend_on_how_examples_are_batched(tiny_t5):
    """Two fake fine-tunes' Grams from the same examples batched 1, 3 and 7 at a time (padded to 3 different
    lengths), in two orders: the RegMean merges agree; counting the padding (the references' rule) does not."""
    from fusion_bench.merging import regmean
    from fusion_bench.statistics import input_grams
    from fusion_bench.t5.model import T5Logits, load_t5

    model, tok = load_t5(OmegaConf.create({"name": "tiny", "pretrained": str(tiny_t5)}))
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    fts = [{k: v + 0.1 * v.std().clamp_min(0.01) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in pre.items()} for _ in range(2)]
    examples = [_t5_examples(), _t5_examples()[::-1][:5]]  # task 2: other examples, fewer

    def merged(batch_size, order=1, positions="family"):
        grams = []
        for ft, ex in zip(fts, examples):
            model.load_state_dict(ft)
            batches = _t5_batches(tok, ex[::order], batch_size)
            if positions == "family":
                grams.append(_t5_grams(T5Logits(model), batches))
            else:
                grams.append(input_grams(T5Logits(model), batches, forward=lambda m, b: m(**b[0]),
                                         size=lambda b: b[0]["input_ids"].shape[0])[0])
        model.load_state_dict(pre)
        return regmean(pre, fts, grams, reduce_non_diagonal_ratio=0.9)

    ref = merged(1)
    gram_keys = [k for k in ref if k.endswith(".weight") and ref[k].dim() == 2 and k != "shared.weight"]
    for bs, order in ((3, 1), (7, 1), (3, -1)):
        other = merged(bs, order)
        for k in gram_keys:
            torch.testing.assert_close(other[k], ref[k], rtol=1e-4, atol=2e-6, msg=f"batch {bs} order {order}: {k}")
    padded = merged(7, positions=None)  # every padded position counted
    moved = max(float((padded[k] - ref[k]).norm() / (fts[0][k] - pre[k]).norm()) for k in gram_keys)
    assert moved > 1e-2  # the test can tell: with padding counted, batching moves the merge


# ---- end to end -------------------------------------------------------------------------------------------------
def _check_report(report, tasks):
    assert report["model"] == "tiny_t5" and report["taskpool"] == "glue"
    assert set(report["tasks"]) == set(tasks)
    for t, r in report["tasks"].items():
        lo = -1.0 if t == "stsb" else 0.0
        assert all(lo <= r[k] <= 1.0 for k in ("zeroshot", "finetuned", "merged")), (t, r)
        # a fine-tune that scores 0 or less (a few tiny steps; a correlation) has no normalized score: null
        assert r["normalized"] == (pytest.approx(r["merged"] / r["finetuned"]) if r["finetuned"] > 0 else None)
    defined = [r["normalized"] for r in report["tasks"].values() if r["normalized"] is not None]
    assert report["average_over"]["normalized"] == len(defined)
    assert report["metrics"] == {t: "spearman" if t == "stsb" else "exact_match" for t in tasks}


def test_end_to_end_standard(make_cfg, tiny_t5, glue_root, tmp_path):
    with pytest.raises(MissingFinetuneError, match=r"python run.py stage=finetune model=tiny_t5 taskpool=glue"):
        run(_cfg(make_cfg, tiny_t5, glue_root, "stage=merge"), tmp_path / "m0", "task_arithmetic")
    report = run(_cfg(make_cfg, tiny_t5, glue_root, "method.scaling_coef=search"), tmp_path / "run1",
                 "task_arithmetic")
    assert json.loads((tmp_path / "run1/report.json").read_text()) == json.loads(json.dumps(report))
    _check_report(report, ["rte", "stsb"])
    assert report["search"]["grid"] == [round(0.05 * i, 2) for i in range(21)]
    assert report["scaling_coef"] in report["search"]["grid"]
    # a random T5 says nothing useful; 12 steps teach it the label words of RTE
    assert report["tasks"]["rte"]["zeroshot"] == 0.0 and report["tasks"]["rte"]["finetuned"] >= 0.5
    # the store keeps every T5 weight under its Hugging Face name
    ckpt = load_safetensors(next((tmp_path / "store/tiny_t5/standard/rte").glob("*.safetensors")))
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in ckpt and "lm_head.weight" in ckpt
    # stage=merge reuses the fine-tunes and writes the merged weights; stage=evaluate reproduces the report
    run(_cfg(make_cfg, tiny_t5, glue_root, "stage=merge", "method=ties"), tmp_path / "m1", "ties")
    assert "shared.weight" in load_safetensors(tmp_path / "m1/merged.safetensors")
    again = run(_cfg(make_cfg, tiny_t5, glue_root, "stage=evaluate", f"method.scaling_coef={report['scaling_coef']}"),
                tmp_path / "run2", "task_arithmetic")
    assert again["tasks"] == report["tasks"]
    # the data-free methods of 2024-2026 over T5 task vectors (task-specific ones too)
    from test_methods_in_modes import METHODS

    for name, extra in METHODS.items():
        r = run(_cfg(make_cfg, tiny_t5, glue_root, "stage=evaluate", f"method={name}", *extra), tmp_path / name, name)
        _check_report(r, ["rte", "stsb"])
        assert (r["storage"] is not None) == (name in ("tall_masks", "emr"))
    # methods that look at data: Gram matrices and Fishers of T5's linear maps on the train split
    for name, kind, extra in (("regmean", "gram", []), ("fisher_merging", "fisher", ["method.statistics.target=label"])):
        r = run(_cfg(make_cfg, tiny_t5, glue_root, "stage=evaluate", f"method={name}",
                     "method.statistics.num_samples=8", *extra), tmp_path / name, name)
        _check_report(r, ["rte", "stsb"])
        assert len(list((tmp_path / "store/tiny_t5/standard/rte").glob(f"*.stat-{kind}-*"))) == 1
    with pytest.raises(ValueError, match=r"statistics.target='sample' is not available.*\['label'\]"):
        run(_cfg(make_cfg, tiny_t5, glue_root, "stage=evaluate", "method=fisher_merging"), tmp_path / "f", "f")
    with pytest.raises(ValueError, match="coefficients=adamerging is not available for model=tiny_t5"):
        run(_cfg(make_cfg, tiny_t5, glue_root, "stage=evaluate", "method=adamerging"), tmp_path / "ada", "ada")
    # analyses reuse the fine-tunes: cosine of the flattened task vectors, computed here independently
    cos = run(_cfg(make_cfg, tiny_t5, glue_root, "stage=analyze", "analysis=cosine"), tmp_path / "a1", "ta")
    from transformers import T5ForConditionalGeneration

    pre = T5ForConditionalGeneration.from_pretrained(tiny_t5).state_dict()
    stored = [load_safetensors(next((tmp_path / f"store/tiny_t5/standard/{t}").glob("seed0-????????????.safetensors")))
              for t in ("rte", "stsb")]
    taus = [torch.cat([(v.double() - pre[k].double()).flatten() for k, v in sorted(s.items())]) for s in stored]
    expected = float(taus[0] @ taus[1] / (taus[0].norm() * taus[1].norm()))
    assert cos["cosine"][0][1] == pytest.approx(expected, abs=1e-6) and (tmp_path / "a1/cosine.png").is_file()
    with pytest.raises(ValueError, match="analysis=cosine or analysis=num_tasks"):
        run(_cfg(make_cfg, tiny_t5, glue_root, "stage=analyze", "analysis=disentanglement"), tmp_path / "a2", "ta")


@pytest.mark.parametrize("mode,method", [("lora", "ties"), ("l_lora", "partial_linearization")])
def test_end_to_end_lora_modes(make_cfg, tiny_t5, glue_root, tmp_path, mode, method):
    cfg = _cfg(make_cfg, tiny_t5, glue_root, f"finetune={mode}", f"method={method}", "finetune.r=4",
               "finetune.alpha=8", "taskpool.tasks=[cola,stsb]", "model.train.steps=6")
    report = run(cfg, tmp_path / "run", method)
    _check_report(report, ["cola", "stsb"])
    if mode == "l_lora":  # LoraHub over the adapters: weights searched on a few val examples
        hub = run(_cfg(make_cfg, tiny_t5, glue_root, f"finetune={mode}", "method=lorahub", "finetune.r=4",
                       "finetune.alpha=8", "taskpool.tasks=[cola,stsb]", "model.train.steps=6", "stage=evaluate",
                       "method.coefficients.budget=4", "method.coefficients.examples_per_task=2"),
                  tmp_path / "hub", "lorahub")
        _check_report(hub, ["cola", "stsb"])
        assert set(hub["learnt_coefficients"]["weights"]) == {"cola", "stsb"}
    ckpt = load_safetensors(next((tmp_path / f"store/tiny_t5/{mode}/cola").glob("*.safetensors")))
    # only the adapters are stored: A and B on q and v of every self- and cross-attention (2+2 layers: 6 modules)
    assert all(".lora_" in k for k in ckpt) and len(ckpt) == 2 * 2 * (2 + 2 * 2)
    assert ckpt["encoder.block.0.layer.0.SelfAttention.q.lora_A.default.weight"].shape == (4, 32)


def test_interrupted_finetune_resumes_to_identical_weights(make_cfg, tiny_t5, glue_root, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    from fusion_bench.stages.finetune import ensure_finetuned
    from fusion_bench.t5 import family, train
    from fusion_bench.t5.family import T5Family

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("simulated crash")

    # 14 steps, resumed at 5: the resumed run passes step 14 - 5 = 9, where a loader built from the resume
    # step used to end Lightning's epoch and replay its batches (issue 34)
    args = ("taskpool.tasks=[rte]", "stage=finetune", "model.train.steps=14")
    reference = load_safetensors(ensure_finetuned(
        T5Family(_cfg(make_cfg, tiny_t5, glue_root, *args, f"paths.store={tmp_path}/a")), "rte"))
    crashed = T5Family(_cfg(make_cfg, tiny_t5, glue_root, *args, f"paths.store={tmp_path}/b"))
    with monkeypatch.context() as m:
        m.setattr(family, "finetune_t5", lambda *a, **k: train.finetune_t5(*a, **k, callbacks=[Crash()]))
        with pytest.raises(RuntimeError, match="simulated crash"):
            ensure_finetuned(crashed, "rte")
    last = crashed.checkpoint("rte").with_suffix(".partial") / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 5
    resumed = load_safetensors(ensure_finetuned(crashed, "rte"))
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_config_errors(make_cfg, tiny_t5, glue_root, tmp_path, monkeypatch):
    from fusion_bench.t5.family import T5Family

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="not available for T5"):
        T5Family.validate(_cfg(make_cfg, tiny_t5, glue_root, "finetune=attention"))
    with pytest.raises(ValueError, match="unknown task"):
        T5Family.validate(_cfg(make_cfg, tiny_t5, glue_root, "taskpool.tasks=[rte,wnli]"))
    with pytest.raises(ValueError, match="overflow float16"):
        T5Family.validate(_cfg(make_cfg, tiny_t5, glue_root, "trainer.precision=16-mixed"))
    bf16 = T5Family(_cfg(make_cfg, tiny_t5, glue_root, "trainer.precision=bf16-mixed",
                         "eval_precision=null"))  # evaluate at the trainer's precision
    assert bf16.eval_where == {"device": torch.device("cpu"), "autocast": torch.bfloat16}
    with pytest.raises(ValueError, match="use taskpool=glue"):
        T5Family.validate(make_cfg("model=tiny_t5"))
    for name in ("flan_t5_base", "flan_t5_large"):
        cfg = make_cfg(f"model={name}", "taskpool=glue", f"paths.cache_dir={tmp_path}")
        assert cfg.model.family == "t5" and cfg.model.hf_id == f"google/{name.replace('_', '-')}"
        T5Family.validate(cfg)
        with pytest.raises(WeightsNotFoundError, match=f"models--google--{name.replace('_', '-')}"):
            run(cfg, tmp_path / "r", "task_arithmetic")
