"""Class names and zero-shot prompt templates of the eight-task benchmark (plain data: no lambdas, picklable).

Class lists are index-aligned with the labels the loaders in `eight_tasks.py` produce. Sources: the class names
that CLIP's authors published for zero-shot evaluation (openai/CLIP `data/prompts.md`, MIT licence) for SUN397,
StanfordCars, RESISC45, DTD, GTSRB and MNIST; EuroSAT uses the same descriptive names, re-ordered to the sorted
folder order of the EuroSAT archive (`EUROSAT_FOLDERS`); SVHN reuses the MNIST digits. Templates are format strings
with one `{}` for the class name.

The data lives in `fusion_bench/assets/eight_tasks_names.json`, read once at import: one entry per table group
(`sun397`, `cars`, `resisc45`, `eurosat`, `digits` (SVHN and MNIST), `gtsrb`, `dtd`), each with `classes` and
`templates` lists (EuroSAT also `folders`, the on-disk folder names index-aligned with `classes`). Orders: SUN397 as
its ClassName.txt, Cars as devkit/cars_meta.mat (label = class - 1), RESISC45 and DTD the sorted folder names
('_' -> ' '), GTSRB the class ids 0..42 (folders 00000..00042). The names below are tuples of str.
"""

from __future__ import annotations

import json
from importlib.resources import files

_DATA = json.loads((files("fusion_bench") / "assets" / "eight_tasks_names.json").read_text(encoding="utf-8"))

SUN397_CLASSES: tuple[str, ...] = tuple(_DATA["sun397"]["classes"])
CARS_CLASSES: tuple[str, ...] = tuple(_DATA["cars"]["classes"])
RESISC45_CLASSES: tuple[str, ...] = tuple(_DATA["resisc45"]["classes"])
EUROSAT_FOLDERS: tuple[str, ...] = tuple(_DATA["eurosat"]["folders"])
EUROSAT_CLASSES: tuple[str, ...] = tuple(_DATA["eurosat"]["classes"])
DIGITS: tuple[str, ...] = tuple(_DATA["digits"]["classes"])
GTSRB_CLASSES: tuple[str, ...] = tuple(_DATA["gtsrb"]["classes"])
DTD_CLASSES: tuple[str, ...] = tuple(_DATA["dtd"]["classes"])

SUN397_TEMPLATES: tuple[str, ...] = tuple(_DATA["sun397"]["templates"])
CARS_TEMPLATES: tuple[str, ...] = tuple(_DATA["cars"]["templates"])
RESISC45_TEMPLATES: tuple[str, ...] = tuple(_DATA["resisc45"]["templates"])
EUROSAT_TEMPLATES: tuple[str, ...] = tuple(_DATA["eurosat"]["templates"])
DIGIT_TEMPLATES: tuple[str, ...] = tuple(_DATA["digits"]["templates"])
GTSRB_TEMPLATES: tuple[str, ...] = tuple(_DATA["gtsrb"]["templates"])
DTD_TEMPLATES: tuple[str, ...] = tuple(_DATA["dtd"]["templates"])

del _DATA
