"""tiny_glue: eight generated text-to-text tasks in GLUE's formats, a stand-in for GLUE made offline (the tiny T5's
world, as tiny_eight is the tiny CLIP's).

Every sentence comes from one small world: names, animals and things, colours, sizes, places, verbs, sentiment
words. The tiny T5 (fusion_bench/t5/tiny_pretrain.py) is pretrained on this world: span corruption of plain
sentences (`world_sentence`), questions answered by a word of the world (`world_qa`), and each task's prompt with a
label word drawn at random (`format_example`), so it knows the words and every task's answer format but none of
the tasks' rules: its zero-shot scores are at chance.

| task | input (glue.TASKS' template)      | rule of the label                                              | metric (GLUE's) |
|------|-----------------------------------|----------------------------------------------------------------|-----------------|
| cola | sentence                          | unacceptable: two adjacent words swapped, a word dropped or doubled | Matthews corr. |
| sst2 | sentence                          | the sentiment word's polarity, flipped by "not"                 | accuracy        |
| mrpc | sentence1, sentence2              | not equivalent: two slots differ (synonyms and word order do not count) | F1     |
| qqp  | question1, question2              | duplicate: the same question in other words                     | F1              |
| stsb | sentence1, sentence2              | score = how many of the 5 slots (colour, animal, verb, object, place) agree | Spearman |
| mnli | premise, hypothesis               | the hypothesis' attribute stated alike / otherwise / not at all | accuracy        |
| qnli | question, sentence                | the sentence gives the asked attribute of the asked thing       | accuracy        |
| rte  | sentence1, sentence2              | sentence2 says a part of sentence1, not two things it changed   | accuracy        |

Accuracy is exact match of the generated label word (glue.exact_match); F1 and Matthews count a generation as
the positive class only when it is the positive label word. Splits are deterministic in (task, `split_seed`,
`version`): `SPLIT_SIZES` examples, labels balanced, no source text in two splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from omegaconf import DictConfig

from .glue import TASKS as GLUE_TASKS
from .glue import Example, GlueTask, make_example

SPLIT_SIZES = {"train": 3000, "val": 100, "test": 200}
SPLITS = ("train", "val", "test")
VERSION = 1  # conf/taskpool/tiny_glue.yaml's `version`: bump when a generator changes

NAMES = ("alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry")
NOUNS = ("cat", "dog", "bird", "horse", "rabbit", "fox", "ball", "book", "box", "cup", "hat", "kite")
COLORS = ("red", "blue", "green", "yellow", "black", "white")
SIZES = ("big", "small")
PLACES = ("park", "garden", "house", "school", "kitchen", "forest", "river", "beach")
VERBS = ("sees", "likes", "chases", "finds", "holds", "follows", "helps", "watches")
STILL_VERBS = ("sleeps", "runs", "sits", "plays", "waits")  # intransitive
SYNONYMS = {"big": "large", "small": "little", "sees": "notices", "likes": "loves", "chases": "pursues",
            "finds": "discovers", "holds": "carries", "follows": "trails", "helps": "assists", "watches": "observes"}
POSITIVE = ("good", "great", "lovely", "wonderful", "happy", "fun")
NEGATIVE = ("bad", "awful", "terrible", "boring", "sad", "ugly")
ADVERBS = ("very", "really", "quite")
FUNCTION_WORDS = ("the", "a", "in", "is", "not", "and", "has", "says", "thinks", "of", "with", "was", "it", "that",
                  "where", "what", "who", "which", "color", "can", "i", "find", "place", "does", "have", "owns",
                  "person", "there", "also", "context:", "question:", "word:", "another", "for", "new", "nothing")
# every word of the world (the tiny T5's vocabulary; prompts and label words come from glue.TASKS)
WORDS = tuple(dict.fromkeys((*FUNCTION_WORDS, *NAMES, *NOUNS, *COLORS, *SIZES, *PLACES, *VERBS, *STILL_VERBS,
                             *SYNONYMS.values(), *POSITIVE, *NEGATIVE, *ADVERBS)))
METRICS = {"cola": "matthews", "sst2": "exact_match", "mrpc": "f1", "qqp": "f1", "stsb": "spearman",
           "mnli": "exact_match", "qnli": "exact_match", "rte": "exact_match"}


def _pick(rng: random.Random, seq, but=None):
    return rng.choice([x for x in seq if x != but])


def _np(rng: random.Random, noun: str | None = None, size: bool | None = None, color: bool | None = None) -> str:
    """'the [size] [colour] noun' (each modifier with probability 1/2 unless given)."""
    words = ["the"]
    if size if size is not None else rng.random() < 0.5:
        words.append(rng.choice(SIZES))
    if color if color is not None else rng.random() < 0.5:
        words.append(rng.choice(COLORS))
    return " ".join([*words, noun or rng.choice(NOUNS)])


def _agent(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.3 else _np(rng)


def fact_words(rng: random.Random) -> list[str]:
    """'<agent> <verb> <agent> in the <place>' as words (no full stop)."""
    return f"{_agent(rng)} {rng.choice(VERBS)} {_agent(rng)} in the {rng.choice(PLACES)}".split()


def _synonymize(words: list[str], rng: random.Random, p: float) -> list[str]:
    return [SYNONYMS[w] if w in SYNONYMS and rng.random() < p else w for w in words]


def _sentiment(rng: random.Random, polarity: int, negated: bool) -> str:
    words = POSITIVE if polarity else NEGATIVE
    adj = rng.choice(words) if rng.random() < 0.6 else f"{rng.choice(ADVERBS)} {rng.choice(words)}"
    adj = f"not {adj}" if negated else adj
    if rng.random() < 0.3:
        adj = f"{adj} and {rng.choice(words)}" if not negated else adj
    form = rng.randrange(4)
    if form == 0:
        return f"{_np(rng)} in the {rng.choice(PLACES)} is {adj}."
    if form == 1:
        return f"{rng.choice(NAMES)} says the {rng.choice(NOUNS)} is {adj}."
    if form == 2:
        return f"{rng.choice(NAMES)} thinks the {rng.choice(PLACES)} was {adj}."
    return f"the {rng.choice(PLACES)} with {_np(rng)} is {adj}."


QUESTIONS = {  # kind -> paraphrases ({np}: 'the [size] [colour] noun'; colour questions: 'the [size] noun')
    "where": ("where is {np}?", "where can i find {np}?", "in which place is {np}?"),
    "color": ("what color is {np}?", "which color does {np} have?", "what is the color of {np}?"),
    "owner": ("who has {np}?", "who owns {np}?", "which person has {np}?"),
}


def _mods(rng: random.Random, kind: str) -> str:
    """Modifiers of a question's noun: a size and (except in a colour question) a colour, each with p 1/2."""
    size = rng.choice(SIZES) if rng.random() < 0.5 else ""
    color = rng.choice(COLORS) if kind != "color" and rng.random() < 0.5 else ""
    return " ".join(w for w in (size, color) if w)


def _question(kind: str, noun: str, mods: str, form: int) -> str:
    return QUESTIONS[kind][form].format(np=f"the {mods} {noun}" if mods else f"the {noun}")


def world_sentence(rng: random.Random) -> str:
    """A plain sentence of the world (what the tiny T5 is pretrained on): facts (with or without synonyms), still
    scenes, sentiments, questions, pairs of facts, or a short text that says a thing again (in other words, or one
    of two facts): no prompt, label word or score."""
    kind = rng.randrange(9)
    if kind == 0:
        return " ".join(_synonymize(fact_words(rng), rng, 0.3)) + "."
    if kind == 1:
        place = f" in the {rng.choice(PLACES)}" if rng.random() < 0.7 else ""
        return f"{_np(rng)} {rng.choice(STILL_VERBS)}{place}."
    if kind == 2:
        return _sentiment(rng, rng.randrange(2), rng.random() < 0.3)
    if kind == 3:
        q = rng.choice(list(QUESTIONS))
        return _question(q, rng.choice(NOUNS), _mods(rng, q), rng.randrange(3))
    if kind in (4, 5):  # two facts, then (kind 5) one of them again
        (a, b), (x, y) = rng.sample(NAMES, 2), rng.sample(NOUNS, 2)
        verb = rng.choice(("has", *VERBS))
        again = " {} {} a {}.".format(*rng.choice(((a, verb, x), (b, verb, y)))) if kind == 5 else ""
        return f"{a} {verb} a {x} and {b} {verb} a {y}.{again}"
    if kind in (6, 7):  # a fact, then the same in other words
        words = fact_words(rng)
        return " ".join(words) + ". " + " ".join(_synonymize(words, rng, 0.7)) + "."
    return _attribute_sentence(rng, rng.choice(NOUNS), rng.sample(("color", "place", "owner"), rng.randint(1, 2)))


def _attribute_sentence(rng: random.Random, noun: str, attrs: list[str]) -> str:
    """A sentence about `noun` that states the attributes `attrs` (of colour, place, owner) and no other."""
    thing = f"the {rng.choice(COLORS)} {noun}" if "color" in attrs else f"the {noun}"
    place = f" in the {rng.choice(PLACES)}" if "place" in attrs else ""
    if "owner" in attrs:
        return f"{rng.choice(NAMES)} has {thing}{place}."
    return f"{thing} is{place}." if place else f"{thing} {rng.choice(STILL_VERBS)}."


def world_qa(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of a question about the world answered by one of its words, never a tiny_glue label word
    (what the tiny T5 is also pretrained on, as Flan-T5 was on other prompted tasks): where / what colour / who has
    a thing said in a context, what a person has among two facts, another word for a word, what word a retelling
    brings that is new (not a synonym) or 'nothing'."""
    kind = rng.randrange(6)
    if kind == 5:
        one = fact_words(rng)
        two = list(one)
        spots = [i for i, w in enumerate(one) if any(w in k for k in (NAMES, NOUNS, COLORS, PLACES, VERBS))]
        new = "nothing"
        if rng.random() < 0.5:
            i = rng.choice(spots)
            new = two[i] = _pick(rng, next(k for k in (NAMES, NOUNS, COLORS, PLACES, VERBS) if one[i] in k), one[i])
        two = _synonymize(two, rng, 0.5)
        new = two[two.index(new)] if new in two else SYNONYMS.get(new, new)
        return f"context: {' '.join(one)}. {' '.join(two)}. question: what is new?", new
    if kind == 3:
        a, b = rng.sample(NAMES, 2)
        (x, y), verb = rng.sample(NOUNS, 2), rng.choice(("has", *VERBS))
        who, what = rng.choice(((a, x), (b, y)))
        return f"context: {a} {verb} a {x} and {b} {verb} a {y}. question: what for {who}?", what
    if kind == 4:
        word = rng.choice(list(SYNONYMS))
        return f"another word for: {word}", SYNONYMS[word]
    attr, noun = ("place", "color", "owner")[kind], rng.choice(NOUNS)
    color, place, name = rng.choice(COLORS), rng.choice(PLACES), rng.choice(NAMES)
    thing = f"the {color} {noun}"
    context = rng.choice((f"{name} has {thing} in the {place}.", f"{thing} of {name} is in the {place}.",
                          f"in the {place}, {name} has {thing}."))
    if rng.random() < 0.5:  # a second thing beside it
        context += f" {_pick(rng, NAMES, name)} has the {_pick(rng, COLORS, color)} {_pick(rng, NOUNS, noun)}."
    question = {"place": f"where is the {noun}?", "color": f"what color is the {noun}?",
                "owner": f"who has the {noun}?"}[attr]
    return f"context: {context} question: {question}", {"place": place, "color": color, "owner": name}[attr]


# ---- the tasks: (rng, label) -> (template fields, raw label) --------------------------------------------------------
def _cola(rng: random.Random, label: int) -> tuple[dict, str]:
    if rng.random() < 0.7:
        words = fact_words(rng)
    else:
        place = f" in the {rng.choice(PLACES)}" if rng.random() < 0.5 else ""
        words = f"{_np(rng)} {rng.choice(STILL_VERBS)}{place}".split()
    if not label:
        op = rng.randrange(3)
        if op == 0:  # swap two adjacent, different words
            i = rng.choice([i for i in range(len(words) - 1) if words[i] != words[i + 1]])
            words[i], words[i + 1] = words[i + 1], words[i]
        elif op == 1:  # drop a determiner, the verb or 'in'
            i = rng.choice([i for i, w in enumerate(words) if w in ("the", "in", *VERBS, *STILL_VERBS)])
            del words[i]
        else:  # double a word
            i = rng.randrange(len(words))
            words.insert(i, words[i])
    return {"sentence": " ".join(words) + "."}, str(label)


def _sst2(rng: random.Random, label: int) -> tuple[dict, str]:
    negated = rng.random() < 0.3
    return {"sentence": _sentiment(rng, label ^ negated, negated)}, str(label)


def _mrpc(rng: random.Random, label: int) -> tuple[dict, str]:
    """'the <size> <colour> <noun> <verb> the <noun> in the <place>.' twice (either with the place first), the
    second with synonyms (size, verb; each with p 1/2); not equivalent: two slots of the second hold other values."""
    kinds = (SIZES, COLORS, NOUNS, VERBS, NOUNS, PLACES)
    one = [rng.choice(k) for k in kinds]
    two = list(one)
    if not label:
        for i in rng.sample(range(len(kinds)), 2):
            two[i] = _pick(rng, kinds[i], one[i])
    two = _synonymize(two, rng, 0.5)

    def say(s: list[str]) -> str:
        form = "in the {5}, the {0} {1} {2} {3} the {4}." if rng.random() < 0.5 else "the {} {} {} {} the {} in the {}."
        return form.format(*s)

    return {"sentence1": say(one), "sentence2": say(two)}, str(label)


def _qqp(rng: random.Random, label: int) -> tuple[dict, str]:
    kind, noun = rng.choice(list(QUESTIONS)), rng.choice(NOUNS)
    mods = _mods(rng, kind)
    f1, f2 = rng.sample(range(3), 2)
    q1 = _question(kind, noun, mods, f1)
    if label:
        q2 = _question(kind, noun, mods, f2)
    else:
        change = rng.randrange(3 if mods else 2)
        if change == 0:  # another question about the same thing
            other = _pick(rng, list(QUESTIONS), kind)
            q2 = _question(other, noun, _mods(rng, other) if other != "color" else "", f2)
        elif change == 1:  # the same question about another thing
            q2 = _question(kind, _pick(rng, NOUNS, noun), mods, f2)
        else:  # the same question about the thing with other modifiers
            other = mods
            while other == mods:
                other = _mods(rng, kind)
            q2 = _question(kind, noun, other, f2)
    return {"question1": q1, "question2": q2}, str(label)


def _stsb(rng: random.Random, label: int) -> tuple[dict, float]:
    """label: how many of the 5 slots agree (0..5), the score."""
    a = [rng.choice(COLORS), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS), rng.choice(PLACES)]
    kinds = (COLORS, NOUNS, VERBS, NOUNS, PLACES)
    keep = set(rng.sample(range(5), label))
    b = [a[i] if i in keep else _pick(rng, kinds[i], a[i]) for i in range(5)]

    def say(s):
        return f"the {s[0]} {s[1]} {s[2]} the {s[3]} in the {s[4]}."

    return {"sentence1": say(a), "sentence2": say(b)}, float(label)


MNLI_LABELS = ("entailment", "neutral", "contradiction")


def _mnli(rng: random.Random, label: int) -> tuple[dict, str]:
    noun, attr = rng.choice(NOUNS), rng.choice(("size", "color", "place"))
    values = {"size": SIZES, "color": COLORS, "place": PLACES}
    stated = {a: rng.choice(values[a]) if a == attr or rng.random() < 0.5 else None for a in values}
    if MNLI_LABELS[label] == "neutral":
        stated[attr] = None
    value = stated[attr] if MNLI_LABELS[label] == "entailment" else _pick(rng, values[attr], stated[attr])
    mods = " ".join(v for v in (stated["size"], stated["color"]) if v)
    place = f" in the {stated['place']}" if stated["place"] else ""
    premise = f"the {mods + ' ' if mods else ''}{noun} {rng.choice(STILL_VERBS)}{place}."
    hypothesis = f"the {noun} is in the {value}." if attr == "place" else f"the {noun} is {value}."
    return {"premise": premise, "hypothesis": hypothesis}, MNLI_LABELS[label]


ASKS = {"where": "place", "color": "color", "owner": "owner"}  # a question's kind -> the attribute it asks


def _qnli(rng: random.Random, label: int) -> tuple[dict, str]:
    kind, noun = rng.choice(list(QUESTIONS)), rng.choice(NOUNS)
    asked, others = ASKS[kind], [a for a in ASKS.values() if a != ASKS[kind]]
    if label == 0:  # entailment: the sentence gives the asked attribute of the asked thing
        attrs, said = [asked, *rng.sample(others, rng.randint(0, 1))], noun
    elif rng.random() < 0.5:  # the attribute, of another thing
        attrs, said = [asked, *rng.sample(others, rng.randint(0, 1))], _pick(rng, NOUNS, noun)
    else:  # the thing, without the attribute
        attrs, said = rng.sample(others, rng.randint(1, 2)), noun
    question = _question(kind, noun, "", 0)
    return {"question": question, "sentence": _attribute_sentence(rng, said, attrs)}, \
        ("entailment", "not_entailment")[label]


def _plain(np: str) -> str:
    """A name, or 'the <noun>' without its modifiers."""
    return " ".join(w for w in np.split() if w not in SIZES and w not in COLORS)


def _other(rng: random.Random, np: str) -> str:
    head = _plain(np)
    return _pick(rng, NAMES, head) if head in NAMES else f"the {_pick(rng, NOUNS, head.split()[-1])}"


def _rte(rng: random.Random, label: int) -> tuple[dict, str]:
    """sentence1: '<agent> <verb> <agent> in the <place>.'; sentence2 says less (no modifiers): the fact without
    its place, the fact, or where the first agent is. Not entailed: two of what sentence2 says are changed."""
    subj, verb, obj, place = _agent(rng), rng.choice(VERBS), _agent(rng), rng.choice(PLACES)
    slots = {"subj": _plain(subj), "verb": verb, "obj": _plain(obj), "place": place}
    form = rng.randrange(3)
    if label == 1:
        change = {"subj": lambda: _other(rng, subj), "verb": lambda: _pick(rng, VERBS, verb),
                  "obj": lambda: _other(rng, obj), "place": lambda: _pick(rng, PLACES, place)}
        for k in rng.sample((("subj", "verb", "obj"), ("subj", "verb", "obj", "place"), ("subj", "place"))[form], 2):
            slots[k] = change[k]()
    s2 = ("{subj} {verb} {obj}.", "{subj} {verb} {obj} in the {place}.", "{subj} is in the {place}.")[form]
    return {"sentence1": f"{subj} {verb} {obj} in the {place}.", "sentence2": s2.format(**slots)}, \
        ("entailment", "not_entailment")[label]


# task -> (generator, number of labels: the raw label is the generator's second argument)
GENERATORS: dict[str, tuple[Callable, int]] = {
    "cola": (_cola, 2), "sst2": (_sst2, 2), "mrpc": (_mrpc, 2), "qqp": (_qqp, 2), "stsb": (_stsb, 6),
    "mnli": (_mnli, 3), "qnli": (_qnli, 2), "rte": (_rte, 2),
}
TASKS = tuple(GENERATORS)


def make_splits(task: str, seed: int = 0, version: int = VERSION) -> dict[str, list[Example]]:
    """{split: examples} of one task: always the same examples for the same (task, seed, version)."""
    if task not in GENERATORS:
        raise KeyError(f"unknown tiny_glue task {task!r}; known tasks: {', '.join(TASKS)}")
    if version != VERSION:
        raise ValueError(f"taskpool.version={version}: this fusion_bench generates tiny_glue version {VERSION}")
    draw, n_labels = GENERATORS[task]
    rng = random.Random(f"tiny_glue/{task}/{seed}/{version}")
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split in SPLITS:
        n = SPLIT_SIZES[split]
        labels = [i % n_labels for i in range(n)]
        rng.shuffle(labels)
        examples = []
        for y in labels:
            for _ in range(1000):  # no source text in two examples (nor two splits)
                fields, raw = draw(rng, y)
                ex = make_example(task, fields, raw)
                if ex.source not in seen:
                    seen.add(ex.source)
                    examples.append(ex)
                    break
            else:
                raise RuntimeError(f"tiny_glue {task}: too few distinct examples of label {raw!r} for SPLIT_SIZES")
        out[split] = examples
    return out


def label_words(task: str) -> tuple[str, ...]:
    """The targets a task's examples can have (STS-B: the score texts 0.0 .. 5.0)."""
    targets = GLUE_TASKS[task].targets
    return tuple(targets.values()) if targets is not None else tuple(f"{i:.1f}" for i in range(6))


def format_example(rng: random.Random) -> Example:
    """A task's prompt with a label word drawn at random, whatever the input says: the answer format of every task
    (its prompt and label words) without its rule. The tiny T5 is pretrained on these too, as Flan-T5 knows GLUE's
    formats, so that it answers each prompt with that task's label words (and a merge of its fine-tunes does too)
    while its zero-shot scores stay at chance."""
    task = rng.choice(TASKS)
    draw, n_labels = GENERATORS[task]
    fields, _ = draw(rng, rng.randrange(n_labels))
    source = make_example(task, fields, 0.0 if task == "stsb" else "1" if task in ("cola", "sst2", "mrpc", "qqp")
                          else "entailment").source
    return Example(source, rng.choice(label_words(task)))


def load_task(taskpool: DictConfig, task: str) -> GlueTask:
    """One task of `taskpool=tiny_glue`, generated (no files); scored with GLUE's metric of the task."""
    splits = make_splits(task, int(taskpool.get("split_seed", 0)), int(taskpool.get("version", VERSION)))
    return GlueTask(task, splits, metric=METRICS[task])
