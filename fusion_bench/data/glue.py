"""GLUE as text-to-text: the official TSV files (or Hugging Face `datasets` copies) -> (prompt, target) pairs.

Prompts and targets follow the T5 paper's GLUE preprocessing, e.g. ``"mrpc sentence1: ... sentence2: ..."`` ->
``"equivalent"``; STS-B's score is rounded to the nearest 0.2 (half to even, like ``tf.round``) and written with
one decimal (``3.4``). Splits: ``test`` = the GLUE dev set (official test labels are hidden), ``val`` = 10% of
train (at most 5000, seed 0: ``taskpool.val_fraction / max_val / split_seed``), ``train`` = the rest.

Files read from ``<data_root>/glue/<Folder>/`` (the layout of the official download, ``download_glue_data.py``):

| task | folder | files                          | columns used                                     | label -> target |
|------|--------|--------------------------------|--------------------------------------------------|-----------------|
| cola | CoLA   | train.tsv, dev.tsv (NO header) | 1 label (0/1), 3 sentence (0 source, 2 orig. mark) | unacceptable / acceptable |
| sst2 | SST-2  | train.tsv, dev.tsv             | sentence, label (0/1)                            | negative / positive |
| mrpc | MRPC   | train.tsv, dev.tsv             | Quality (0/1), #1 String, #2 String              | not_equivalent / equivalent |
| qqp  | QQP    | train.tsv, dev.tsv             | question1, question2, is_duplicate (0/1)         | not_duplicate / duplicate |
| stsb | STS-B  | train.tsv, dev.tsv             | sentence1, sentence2, score (0..5)               | rounded score text |
| mnli | MNLI   | train.tsv, dev_matched.tsv     | sentence1 (premise), sentence2 (hypothesis), gold_label (last column) | as written |
| qnli | QNLI   | train.tsv, dev.tsv             | question, sentence, label                        | as written |
| rte  | RTE    | train.tsv, dev.tsv             | sentence1, sentence2, label                      | as written |

Files are tab-separated without quoting (quote characters are text); a BOM (MRPC) is ignored; rows with missing
fields (a few malformed lines in some QQP copies) are skipped with a warning; an unknown label is an error.

A Hugging Face copy is read instead when present (needs ``pip install 'fusion_bench[hf]'``): a
``DatasetDict.save_to_disk`` folder in ``glue/<Folder>/`` or the parquet files of the Hub's ``nyu-mll/glue`` in
``glue/<task>/`` (``train-*.parquet``, ``validation-*.parquet``; MNLI ``validation_matched-*.parquet``), with the
Hub's columns (``sentence1``, ``premise``, ... and the integer ``label``; STS-B's float ``label``).

Metrics: exact match of the generated text against the target (both stripped and lower-cased); for STS-B the
Spearman correlation between the number parsed from the generated text and the gold score. `f1` and `matthews`
(GLUE's MRPC / QQP and CoLA metrics, which taskpool=tiny_glue uses) count a generation as positive only when it is
the positive label word. Text that holds no
number counts as ``STSB_FALLBACK`` = 0.0 (the bottom of the 0-5 scale); a constant prediction (undefined
correlation) scores 0.0.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from fusion_bench.data.hf_copies import hf_splits, load_hf_split

log = logging.getLogger(__name__)

STSB_FALLBACK = 0.0
_BINARY = ("0", "1")


@dataclass(frozen=True)
class GlueSpec:
    folder: str
    template: str                       # str.format over the field names below
    fields: dict[str, str | int]        # template field -> TSV column (header name, or index for headerless files)
    label: str | int                    # the label column
    targets: dict[str, str] | None      # raw label -> target text; None: regression (STS-B)
    dev_file: str = "dev.tsv"
    header: bool = True
    hf_fields: dict[str, str] = field(default_factory=dict)  # template field -> `datasets` GLUE column
    hf_dev: str = "validation"


def _binary(neg: str, pos: str) -> dict[str, str]:
    return dict(zip(_BINARY, (neg, pos)))


def _same(*labels: str) -> dict[str, str]:
    return {x: x for x in labels}


TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", "cola sentence: {sentence}", {"sentence": 3}, 1, _binary("unacceptable", "acceptable"),
                     header=False, hf_fields={"sentence": "sentence"}),
    "mnli": GlueSpec("MNLI", "mnli hypothesis: {hypothesis} premise: {premise}",
                     {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label",
                     _same("entailment", "neutral", "contradiction"), dev_file="dev_matched.tsv",
                     hf_fields={"premise": "premise", "hypothesis": "hypothesis"}, hf_dev="validation_matched"),
    "mrpc": GlueSpec("MRPC", "mrpc sentence1: {sentence1} sentence2: {sentence2}",
                     {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality",
                     _binary("not_equivalent", "equivalent"),
                     hf_fields={"sentence1": "sentence1", "sentence2": "sentence2"}),
    "qnli": GlueSpec("QNLI", "qnli question: {question} sentence: {sentence}",
                     {"question": "question", "sentence": "sentence"}, "label", _same("entailment", "not_entailment"),
                     hf_fields={"question": "question", "sentence": "sentence"}),
    "qqp": GlueSpec("QQP", "qqp question1: {question1} question2: {question2}",
                    {"question1": "question1", "question2": "question2"}, "is_duplicate",
                    _binary("not_duplicate", "duplicate"),
                    hf_fields={"question1": "question1", "question2": "question2"}),
    "rte": GlueSpec("RTE", "rte sentence1: {sentence1} sentence2: {sentence2}",
                    {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", _same("entailment", "not_entailment"),
                    hf_fields={"sentence1": "sentence1", "sentence2": "sentence2"}),
    "sst2": GlueSpec("SST-2", "sst2 sentence: {sentence}", {"sentence": "sentence"}, "label",
                     _binary("negative", "positive"), hf_fields={"sentence": "sentence"}),
    "stsb": GlueSpec("STS-B", "stsb sentence1: {sentence1} sentence2: {sentence2}",
                     {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", None,
                     hf_fields={"sentence1": "sentence1", "sentence2": "sentence2"}),
}
# `datasets`' GLUE integer labels, in order (glue.py of the HF hub data set)
HF_LABELS = {"cola": _BINARY, "sst2": _BINARY, "mrpc": _BINARY, "qqp": _BINARY,
             "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
             "rte": ("entailment", "not_entailment")}


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    score: float | None = None  # STS-B gold score


def stsb_target(score: float) -> str:
    return f"{round(float(score) * 5) / 5:.1f}"


def make_example(task: str, values: dict[str, str], label: str | float) -> Example:
    """The prompt and target of one row: `values` maps the template's fields to text, `label` is the raw label."""
    spec = TASKS[task]
    source = spec.template.format(**{k: " ".join(str(v).split()) for k, v in values.items()})
    if spec.targets is None:
        return Example(source, stsb_target(float(label)), float(label))
    key = str(label).strip()
    if key not in spec.targets:
        raise ValueError(f"GLUE {task}: unknown label {label!r}; expected one of {list(spec.targets)}")
    return Example(source, spec.targets[key])


# ---- reading ----------------------------------------------------------------------------------------------------
def task_dir(data_root: str | Path, task: str) -> Path:
    return Path(data_root).expanduser() / "glue" / TASKS[task].folder


def read_tsv(task: str, path: Path) -> list[Example]:
    spec = TASKS[task]
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if spec.header:
        header, lines = lines[0].split("\t"), lines[1:]
        want = [*spec.fields.values(), spec.label]
        missing = [c for c in want if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in the header {header}: not the official GLUE {task} TSV")
        # MNLI has one label column per annotator before gold_label: take the last column of that name
        col = {c: len(header) - 1 - header[::-1].index(c) for c in want}
    else:
        col = {c: c for c in [*spec.fields.values(), spec.label]}
    need = max(col.values()) + 1
    out, skipped = [], 0
    for i, line in enumerate(lines, start=2 if spec.header else 1):
        row = line.split("\t")
        if len(row) < need or not line.strip():
            skipped += 1
            continue
        try:
            out.append(make_example(task, {k: row[col[c]] for k, c in spec.fields.items()}, row[col[spec.label]]))
        except ValueError as e:
            raise ValueError(f"{path}, line {i}: {e}") from None
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", path, skipped)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _read_hf(task: str, folder: Path, split: str, splits: dict[str, list[Path]]) -> list[Example]:
    spec = TASKS[task]
    name = "train" if split == "train" else spec.hf_dev
    if name not in splits:
        raise ValueError(f"GLUE {task}: the Hugging Face copy in {folder} has the splits {sorted(splits)}; "
                         f"expected {name!r}")
    labels = HF_LABELS.get(task)
    return [make_example(task, {k: row[c] for k, c in spec.hf_fields.items()},
                         row["label"] if labels is None else labels[int(row["label"])])
            for row in load_hf_split(folder, name, splits[name])]


def read_split(task: str, data_root: str | Path, split: str) -> list[Example]:
    """GLUE `train` or `dev` examples of `task`, from the TSV files or a Hugging Face copy (a `datasets`
    save_to_disk folder in glue/<Folder>/, or the parquet files of the Hub's nyu-mll/glue in glue/<task>/)."""
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(TASKS)}")
    folder = task_dir(data_root, task)
    path = folder / ("train.tsv" if split == "train" else TASKS[task].dev_file)
    for hf in (folder, folder.parent / task):
        if splits := hf_splits(hf):
            try:
                return _read_hf(task, hf, split, splits)
            except ImportError as e:
                if not path.is_file():
                    raise
                log.warning("%s: reading the TSV files instead", e)
            break
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE {task}: {path} not found. Expected {folder}/train.tsv and {folder}/{TASKS[task].dev_file} "
            f"(the official GLUE download, e.g. download_glue_data.py), a datasets.save_to_disk copy there or the "
            f"Hub's parquet files ({folder.parent / task}/train-*.parquet); set paths.data_root (taskpool.data_root) "
            f"to the folder that contains glue/, or fetch it: python -m fusion_bench.data.prepare glue --root "
            f"{Path(data_root).expanduser()} --tasks {task}")
    return read_tsv(task, path)


@dataclass
class GlueTask:
    name: str
    splits: dict[str, list[Example]]
    metric: str | None = None  # one of METRICS; None: `default_metric` (exact match, Spearman for STS-B)

    @property
    def regression(self) -> bool:
        return TASKS[self.name].targets is None

    def split(self, split: str) -> list[Example]:
        return self.splits[split]

    @property
    def metric_name(self) -> str:
        return self.metric or default_metric(self.name)

    def score(self, predictions: list[str], split: str) -> float:
        return score(self.name, predictions, self.splits[split], self.metric)


def carve_val(n: int, fraction: float, max_val: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices): val is `fraction` of n (at most max_val, at least 1), seeded."""
    k = min(int(max_val), max(1, int(n * float(fraction))))
    if k >= n:
        raise ValueError(f"a training set of {n} examples is too small to carve {k} validation examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def load_glue_task(taskpool: DictConfig, task: str) -> GlueTask:
    data_root = taskpool.data_root
    train = read_split(task, data_root, "train")
    test = read_split(task, data_root, "dev")
    tr, va = carve_val(len(train), taskpool.get("val_fraction", 0.1), taskpool.get("max_val", 5000),
                       taskpool.get("split_seed", 0))
    return GlueTask(task, {"train": [train[i] for i in tr], "val": [train[i] for i in va], "test": test})


# ---- metrics ----------------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(predictions: list[str], targets: list[str]) -> float:
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    return sum(normalize_text(p) == normalize_text(t) for p, t in zip(predictions, targets)) / len(targets)


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_score(text: str) -> float:
    """The first number in the generated text; STSB_FALLBACK when there is none."""
    m = _NUMBER.search(text)
    return float(m.group()) if m else STSB_FALLBACK


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x)
    start = 0
    n = len(x)
    while start < n:
        end = start
        while end + 1 < n and xs[end + 1] == xs[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: list[float], gold: list[float]) -> float:
    """Spearman's rho (Pearson on average ranks); 0.0 where it is undefined (a constant input)."""
    p, g = (torch.tensor(v, dtype=torch.float64) for v in (predictions, gold))
    rp, rg = _ranks(p), _ranks(g)
    rp, rg = rp - rp.mean(), rg - rg.mean()
    denom = math.sqrt(float((rp * rp).sum() * (rg * rg).sum()))
    return float((rp * rg).sum()) / denom if denom > 0 else 0.0


def positive_target(task: str) -> str:
    """The target text of a binary task's positive class (label 1: acceptable, equivalent, duplicate, ...)."""
    targets = TASKS[task].targets
    if targets is None or set(targets) != set(_BINARY):
        raise ValueError(f"GLUE {task} has no 0/1 labels: F1 and Matthews correlation need a binary task")
    return targets["1"]


def _positives(task: str, predictions: list[str], examples: list[Example]) -> tuple[list[bool], list[bool]]:
    """(predicted positive, gold positive): a generation is positive only when it is the positive label word."""
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} targets")
    pos = normalize_text(positive_target(task))
    return [normalize_text(p) == pos for p in predictions], [normalize_text(e.target) == pos for e in examples]


def f1(task: str, predictions: list[str], examples: list[Example]) -> float:
    """F1 of the positive class (GLUE's MRPC / QQP metric); 0.0 with no true positive."""
    pred, gold = _positives(task, predictions, examples)
    tp = sum(p and g for p, g in zip(pred, gold))
    return 2 * tp / (sum(pred) + sum(gold)) if tp else 0.0


def matthews(task: str, predictions: list[str], examples: list[Example]) -> float:
    """Matthews correlation of positive vs the rest (GLUE's CoLA metric); 0.0 where it is undefined."""
    pred, gold = _positives(task, predictions, examples)
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fp, fn = sum(pred) - tp, sum(gold) - tp
    denom = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


METRICS = ("exact_match", "spearman", "f1", "matthews")


def default_metric(task: str) -> str:
    """What taskpool=glue scores: exact match of the label word, Spearman for STS-B."""
    return "spearman" if TASKS[task].targets is None else "exact_match"


def score(task: str, predictions: list[str], examples: list[Example], metric: str | None = None) -> float:
    metric = metric or default_metric(task)
    if metric == "spearman":
        if TASKS[task].targets is not None:
            raise ValueError(f"GLUE {task} has label words: Spearman needs a score (STS-B)")
        return spearman([parse_score(p) for p in predictions], [e.score for e in examples])
    if metric == "exact_match":
        return exact_match(predictions, [e.target for e in examples])
    if metric == "f1":
        return f1(task, predictions, examples)
    if metric == "matthews":
        return matthews(task, predictions, examples)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
