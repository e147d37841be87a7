"""The official split sizes, as the loaders read them: what `python -m fusion_bench.data.prepare` checks a
copy against.

eight_tasks (fusion_bench/data/eight_tasks.py): the official train and test splits. EuroSAT has no official
split: its 27,000 images give test = a stratified 10% (2,700) and train = the rest. SUN397: partition 1
(Training_01 / Testing_01). DTD: train = train1 + val1, test = test1. RESISC45: the torchgeo / task-vectors
split (train 60%, test 20%). val is carved from train afterwards (taskpool.val_fraction, at most
taskpool.max_val).

GLUE (fusion_bench/data/glue.py): train and the dev set the loader uses as test (MNLI: dev_matched).
"""

from __future__ import annotations

EIGHT_TASKS: dict[str, dict[str, int]] = {
    "sun397": {"train": 19_850, "test": 19_850},
    "cars": {"train": 8_144, "test": 8_041},
    "resisc45": {"train": 18_900, "test": 6_300},
    "eurosat": {"train": 24_300, "test": 2_700},
    "svhn": {"train": 73_257, "test": 26_032},
    "gtsrb": {"train": 26_640, "test": 12_630},
    "mnist": {"train": 60_000, "test": 10_000},
    "dtd": {"train": 3_760, "test": 1_880},
}

GLUE: dict[str, dict[str, int]] = {
    "cola": {"train": 8_551, "dev": 1_043},
    "mnli": {"train": 392_702, "dev": 9_815},
    "mrpc": {"train": 3_668, "dev": 408},
    "qnli": {"train": 104_743, "dev": 5_463},
    "qqp": {"train": 363_846, "dev": 40_430},
    "rte": {"train": 2_490, "dev": 277},
    "sst2": {"train": 67_349, "dev": 872},
    "stsb": {"train": 5_749, "dev": 1_500},
}
