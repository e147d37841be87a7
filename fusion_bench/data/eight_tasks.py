"""The eight-task image benchmark (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD) read from disk.

Each task is read from `paths.data_root` (`taskpool.data_root`) in its usual on-disk format; nothing is downloaded.
`<D>` below is the data root; the first layout found wins:

  sun397    <D>/sun397/SUN397/ClassName.txt, <D>/sun397/SUN397/<letter>/<class>[/<sub>]/sun_*.jpg and the official
            partition files Training_01.txt / Testing_01.txt in <D>/sun397/SUN397/Partitions/ (or next to SUN397/)
            (torchvision SUN397(root=<D>/sun397), filtered by partition 1)
  cars      <D>/cars/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg,
            cars_test/*.jpg, cars_test_annos_withlabels.mat} (torchvision StanfordCars(root=<D>/cars))
  resisc45  <D>/resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg with the split files
            <D>/resisc45/resisc45-{train,test}.txt (one image file name per line: the torchgeo / task-vectors split)
  eurosat   <D>/eurosat/2750/<AnnualCrop|Forest|...>/*.jpg (torchvision EuroSAT(root=<D>)); EuroSAT has no
            official split: a fixed stratified 10% (seed 0) of each class is the test set
  svhn      <D>/svhn/train_32x32.mat and test_32x32.mat (torchvision SVHN(root=<D>/svhn); md5 not checked)
  gtsrb     <D>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm, <D>/gtsrb/GTSRB/Final_Test/Images/*.ppm and
            <D>/gtsrb/GT-final_test.csv (torchvision GTSRB(root=<D>))
  mnist     <D>/mnist/MNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte, uncompressed
            (torchvision MNIST(root=<D>/mnist))
  dtd       <D>/dtd/dtd/images/<class>/*.jpg and <D>/dtd/dtd/labels/{train,val,test}1.txt (torchvision
            DTD(root=<D>)); train = train1 + val1, test = test1
  any task  a Hugging Face `datasets` copy in <D>/<task>/ (needs `pip install 'fusion_bench[hf]'`): a
            DatasetDict.save_to_disk folder (dataset_dict.json, train/, test/) or the parquet files of a Hub
            snapshot (data/train-*.parquet and data/test-*.parquet; also <split>-*.parquet or <split>/*.parquet),
            converted to arrow once and cached in <D>/<task>/.hf_cache. Columns: 'image' or 'img' (an Image
            feature, decoded per sample) and 'label' or 'labels': ClassLabel names are mapped to our classes by name
            (any class order), plain integers are taken as our class indices
  any task  an image-folder copy <D>/<task>/{train,test}/<class folder>/*.{jpg,png,...}, class folders named like
            the class (case, spaces, '_', '-', '/' ignored), by EuroSAT's folder names, or by class index (00012)

For the torchvision layouts the torchvision root is tried as <D>/<task> and as <D> itself, so a folder filled by
`torchvision.datasets.X(root=<D>, download=True)` also works. Splits: `test` is the official test split; `train`
and `val` are carved from the official train split exactly like the task-vectors code does
(`random_split(train, [n - n_val, n_val], generator=torch.Generator().manual_seed(0))` with
n_val = min(int(0.1 n), 5000)). Samples are (preprocessed image tensor, int label) with open_clip's train-time
transform on `train` (unless `taskpool.train_augment=false`) and its test-time transform on `val` / `test`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from . import eight_tasks_names as names
from .hf_copies import hf_splits, load_hf_split

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    pass


class DatasetFormatError(ValueError):
    pass


@dataclass(frozen=True)
class EightTask:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    folder_keys: tuple[str, ...] | None = None  # on-disk class names, index-aligned with classnames


TASKS: dict[str, EightTask] = {
    t.name: t
    for t in [
        EightTask("sun397", names.SUN397_CLASSES, names.SUN397_TEMPLATES),
        EightTask("cars", names.CARS_CLASSES, names.CARS_TEMPLATES),
        EightTask("resisc45", names.RESISC45_CLASSES, names.RESISC45_TEMPLATES),
        EightTask("eurosat", names.EUROSAT_CLASSES, names.EUROSAT_TEMPLATES, names.EUROSAT_FOLDERS),
        EightTask("svhn", names.DIGITS, names.DIGIT_TEMPLATES),
        EightTask("gtsrb", names.GTSRB_CLASSES, names.GTSRB_TEMPLATES),
        EightTask("mnist", names.DIGITS, names.DIGIT_TEMPLATES),
        EightTask("dtd", names.DTD_CLASSES, names.DTD_TEMPLATES),
    ]
}


# ---- labels -----------------------------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def class_index(task: EightTask, folder: str) -> int:
    """The class index of an on-disk class name (folder or class list entry)."""
    keys = task.folder_keys or ()
    if folder in keys:
        return keys.index(folder)
    wanted = _norm(folder)
    for candidates in (keys, task.classnames):
        normed = [_norm(c) for c in candidates]
        if wanted in normed:
            return normed.index(wanted)
    if folder.isdigit() and int(folder) < len(task.classnames):
        return int(folder)
    raise DatasetFormatError(f"{task.name}: unknown class {folder!r} (expected one of {list(keys or task.classnames)[:5]}...)")


def _remap(task: EightTask, classes, raw_labels) -> np.ndarray:
    table = np.array([class_index(task, str(c)) for c in classes], dtype=np.int64)
    return table[np.asarray(raw_labels, dtype=np.int64)]


# ---- on-disk sources --------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One official split: a data set yielding (PIL image, anything) and the benchmark label of every sample."""

    dataset: Dataset
    labels: np.ndarray


class _FileList(Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader

        return default_loader(str(self.paths[i])), -1


def _image_folder(task: EightTask, root: Path, split: str) -> Source:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root / split))
    return Source(ds, _remap(task, ds.classes, ds.targets))


def _mnist(task: EightTask, root: Path, split: str) -> Source:
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=split == "train", download=False)
    return Source(ds, ds.targets.numpy().astype(np.int64))


def _svhn(task: EightTask, root: Path, split: str) -> Source:
    from torchvision.datasets import SVHN

    class _LocalSVHN(SVHN):  # torchvision checks the md5 of the official files; read any file in the format
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    ds = _LocalSVHN(str(root), split=split, download=False)
    return Source(ds, np.asarray(ds.labels, dtype=np.int64))


def _gtsrb(task: EightTask, root: Path, split: str) -> Source:
    from torchvision.datasets import GTSRB

    ds = GTSRB(str(root), split=split, download=False)
    if split == "train":  # the class id is the folder name (torchvision enumerates the folders present)
        labels = [int(Path(p).parent.name) for p, _ in ds._samples]
    else:
        labels = [y for _, y in ds._samples]
    return Source(ds, np.asarray(labels, dtype=np.int64))


def _dtd(task: EightTask, root: Path, split: str) -> Source:
    from torchvision.datasets import DTD

    parts = [DTD(str(root), split=s, partition=1, download=False) for s in (["train", "val"] if split == "train" else ["test"])]
    labels = np.concatenate([_remap(task, d.classes, d._labels) for d in parts])
    return Source(ConcatDataset(parts) if len(parts) > 1 else parts[0], labels)


def _eurosat(task: EightTask, root: Path, split: str) -> Source:
    from torch.utils.data import Subset
    from torchvision.datasets import EuroSAT

    ds = EuroSAT(str(root), download=False)
    labels = _remap(task, ds.classes, ds.targets)
    rng = np.random.default_rng(0)
    test = []
    for c in range(len(task.classnames)):
        idx = np.flatnonzero(labels == c)
        test += rng.permutation(idx)[: round(0.1 * len(idx))].tolist()
    chosen = sorted(test) if split == "test" else sorted(set(range(len(labels))) - set(test))
    return Source(Subset(ds, chosen), labels[chosen])


def _cars(task: EightTask, root: Path, split: str) -> Source:
    from torchvision.datasets import StanfordCars

    ds = StanfordCars(str(root), split=split, download=False)
    if len(ds.classes) != len(task.classnames):
        raise DatasetFormatError(
            f"cars: {root}/stanford_cars/devkit/cars_meta.mat lists {len(ds.classes)} classes, expected "
            f"{len(task.classnames)}"
        )
    return Source(ds, np.asarray([y for _, y in ds._samples], dtype=np.int64))


def _sun397_partition(root: Path, split: str) -> Path | None:
    name = "Training_01.txt" if split == "train" else "Testing_01.txt"
    for folder in (root / "SUN397" / "Partitions", root / "Partitions", root / "SUN397", root):
        if (folder / name).is_file():
            return folder / name
    return None


def _sun397(task: EightTask, root: Path, split: str) -> Source:
    from torch.utils.data import Subset
    from torchvision.datasets import SUN397

    part = _sun397_partition(root, split)
    if part is None:
        raise DatasetNotFoundError(
            f"sun397: found {root / 'SUN397'} but not the official partition files Training_01.txt / "
            f"Testing_01.txt (from SUN397's Partitions.zip); put them in {root / 'SUN397' / 'Partitions'}"
        )
    ds = SUN397(str(root), download=False)
    data_dir = Path(ds._data_dir)
    where = {"/" + p.relative_to(data_dir).as_posix(): i for i, p in enumerate(ds._image_files)}
    wanted = [line.strip() for line in part.read_text().splitlines() if line.strip()]
    missing = [w for w in wanted if w not in where]
    if missing:
        raise DatasetFormatError(f"sun397: {len(missing)} images listed in {part} are missing, e.g. {missing[:3]}")
    idx = [where[w] for w in wanted]
    labels = _remap(task, ds.classes, ds._labels)[idx]
    return Source(Subset(ds, idx), labels)


def _resisc45(task: EightTask, root: Path, split: str) -> Source:
    lines = [s.strip() for s in (root / f"resisc45-{split}.txt").read_text().splitlines() if s.strip()]
    paths, labels = [], []
    for fname in lines:
        cls = fname.rsplit("_", 1)[0]
        paths.append(root / "NWPU-RESISC45" / cls / fname)
        labels.append(class_index(task, cls))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetFormatError(f"resisc45: {len(missing)} images listed in resisc45-{split}.txt are missing, "
                                 f"e.g. {missing[0]}")
    return Source(_FileList(paths), np.asarray(labels, dtype=np.int64))


# ---- Hugging Face `datasets` copies (optional dependency: pip install 'fusion_bench[hf]') --------------------------
class _HFImages(Dataset):
    """(PIL RGB image, -1) from the image column of a `datasets.Dataset`, decoded one item at a time."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds.select_columns([column]), column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][self.column].convert("RGB"), -1


def _hf(task: EightTask, root: Path, split: str) -> Source:
    splits = hf_splits(root)
    if "train" not in splits or "test" not in splits:
        raise DatasetFormatError(f"{task.name}: the Hugging Face copy in {root} has the splits {sorted(splits)}; "
                                 f"expected 'train' and 'test'")
    ds = load_hf_split(root, split, splits[split])
    where = f"{task.name}: {root} ({split} split)"
    feats = ds.features
    image = next((c for c in ("image", "img") if c in feats), None)
    label = next((c for c in ("label", "labels") if c in feats), None)
    if image is None or label is None:
        raise DatasetFormatError(f"{where}: columns {list(feats)}; expected an image column 'image' or 'img' and a "
                                 f"label column 'label' or 'labels'")
    import datasets

    if not isinstance(feats[image], datasets.Image):
        raise DatasetFormatError(f"{where}: column {image!r} is {feats[image]}, expected a datasets Image feature")
    raw = np.asarray(ds.with_format("arrow")[label])
    names = feats[label].names if isinstance(feats[label], datasets.ClassLabel) else None
    n = len(task.classnames) if names is None else len(names)
    if raw.dtype.kind not in "iu" or len(raw) and (raw.min() < 0 or raw.max() >= n):
        raise DatasetFormatError(f"{where}: column {label!r} must hold integer labels in [0, {n}), found "
                                 f"{raw.dtype} values {raw[:5].tolist()}...")
    try:  # a ClassLabel names its classes: map them by name, so any class order works
        labels = raw.astype(np.int64) if names is None else _remap(task, names, raw)
    except DatasetFormatError as e:
        why = str(e).removeprefix(f"{task.name}: ")
        raise DatasetFormatError(f"{where}: ClassLabel names of column {label!r}: {why}") from None
    return Source(_HFImages(ds, image), labels)


@dataclass(frozen=True)
class Layout:
    describe: str
    roots: tuple[str, ...]  # "task": <D>/<task>, "data": <D>
    exists: Callable[[Path], bool]
    open: Callable[[EightTask, Path, str], Source]


_FOLDER = Layout("image folder <D>/{task}/{train,test}/<class>/*.{jpg,png,...}", ("task",),
                 lambda r: (r / "train").is_dir() and (r / "test").is_dir(), _image_folder)

# a Hugging Face copy is recognised by its own files (dataset_dict.json, *.parquet), so it goes before the image
# folder, which would also match a save_to_disk folder's train/ and test/
_HF = Layout("Hugging Face datasets copy: <D>/{task}/ holding a DatasetDict.save_to_disk folder (dataset_dict.json, "
             "train/, test/) or a Hub snapshot's parquet files (data/{train,test}-*.parquet), with an image column "
             "'image' or 'img' and a label column 'label' or 'labels' (needs pip install 'fusion_bench[hf]')",
             ("task",), lambda r: bool(hf_splits(r)), _hf)

LAYOUTS: dict[str, list[Layout]] = {
    "sun397": [Layout("torchvision SUN397: <D>/sun397/SUN397/ClassName.txt, <letter>/<class>/sun_*.jpg and "
                      "SUN397/Partitions/{Training,Testing}_01.txt", ("task", "data"),
                      lambda r: (r / "SUN397" / "ClassName.txt").is_file(), _sun397)],
    "cars": [Layout("torchvision StanfordCars: <D>/cars/stanford_cars/{devkit/cars_meta.mat, "
                    "devkit/cars_train_annos.mat, cars_train/, cars_test/, cars_test_annos_withlabels.mat}",
                    ("task", "data"), lambda r: (r / "stanford_cars" / "devkit").is_dir(), _cars)],
    "resisc45": [Layout("NWPU-RESISC45 with split files: <D>/resisc45/NWPU-RESISC45/<class>/<class>_NNN.jpg and "
                        "<D>/resisc45/resisc45-{train,test}.txt", ("task",),
                        lambda r: (r / "NWPU-RESISC45").is_dir() and (r / "resisc45-train.txt").is_file(),
                        _resisc45)],
    "eurosat": [Layout("torchvision EuroSAT: <D>/eurosat/2750/<AnnualCrop|Forest|...>/*.jpg", ("data", "task"),
                       lambda r: (r / "eurosat" / "2750").is_dir(), _eurosat)],
    "svhn": [Layout("torchvision SVHN: <D>/svhn/train_32x32.mat and <D>/svhn/test_32x32.mat", ("task",),
                    lambda r: (r / "train_32x32.mat").is_file() or (r / "test_32x32.mat").is_file(), _svhn)],
    "gtsrb": [Layout("torchvision GTSRB: <D>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm, "
                     "<D>/gtsrb/GTSRB/Final_Test/Images/*.ppm, <D>/gtsrb/GT-final_test.csv", ("data", "task"),
                     lambda r: (r / "gtsrb" / "GTSRB" / "Training").is_dir(), _gtsrb)],
    "mnist": [Layout("torchvision MNIST: <D>/mnist/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
                     ("task", "data"), lambda r: (r / "MNIST" / "raw").is_dir(), _mnist)],
    "dtd": [Layout("torchvision DTD: <D>/dtd/dtd/images/<class>/*.jpg and <D>/dtd/dtd/labels/{train,val,test}1.txt",
                   ("data", "task"), lambda r: (r / "dtd" / "dtd" / "labels").is_dir(), _dtd)],
}


def find_layout(name: str, data_root: str | Path) -> tuple[Layout, Path]:
    """The first on-disk layout of task `name` present under data_root, or DatasetNotFoundError naming what to do."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; the eight tasks are {', '.join(TASKS)}")
    data_root = Path(data_root).expanduser()
    task_root = data_root / name
    looked = []
    for layout in [*LAYOUTS[name], _HF, _FOLDER]:
        for which in layout.roots:
            root = task_root if which == "task" else data_root
            if layout.exists(root):
                return layout, root
        looked.append(layout.describe.replace("<D>", str(data_root)).replace("{task}", name))
    raise DatasetNotFoundError(
        f"task {name!r}: no data set found in {task_root} (paths.data_root={data_root}). Expected one of:\n"
        + "\n".join(f"  - {d}" for d in looked)
        + "\n(a torchvision layout may also use the data root itself as torchvision's root.) Put the data there or "
        f"point paths.data_root at the folder holding {name}/; nothing is downloaded at run time (where a network "
        f"exists, python -m fusion_bench.data.prepare eight_tasks --root {data_root} --tasks {name} fetches it)."
    )


# ---- splits and transforms ------------------------------------------------------------------------------------------
def val_size(n: int, fraction: float = 0.1, max_val: int = 5000) -> int:
    return min(int(n * fraction), max_val)


def carve_val(n: int, fraction: float = 0.1, max_val: int = 5000, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices into the official train split, as torch.utils.data.random_split(seed) draws them."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = n - val_size(n, fraction, max_val)
    return perm[:n_train], perm[n_train:]


class TaskSplit(Dataset):
    """(transform(image), label) over chosen samples of a Source; picklable for DataLoader workers."""

    def __init__(self, source: Source, indices, transform):
        self.dataset = source.dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = source.labels[self.indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        image = self.dataset[int(self.indices[i])][0]
        return self.transform(image), int(self.labels[i])


def clip_transform(image_size, mean, std, train: bool):
    import open_clip

    return open_clip.image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std))


class SplitLoader:
    """Loads the splits of one task lazily (the official train split is read once for train and val)."""

    def __init__(self, task: EightTask, layout: Layout, root: Path, image_size, mean, std, train_augment: bool = True,
                 val_fraction: float = 0.1, max_val: int = 5000, seed: int = 0, eval_cache: Path | None = None,
                 num_workers: int = 0):
        self.task, self.layout, self.root = task, layout, root
        self.eval_cache, self.num_workers = eval_cache, num_workers  # val / test decoded once into eval_cache
        self.image_size, self.mean, self.std = image_size, mean, std
        self.train_augment, self.val_fraction, self.max_val, self.seed = train_augment, val_fraction, max_val, seed
        self._sources: dict[str, Source] = {}

    def source(self, official: str) -> Source:
        if official not in self._sources:
            try:
                self._sources[official] = self.layout.open(self.task, self.root, official)
            except RuntimeError as e:  # torchvision: "Dataset not found ..."
                raise DatasetNotFoundError(
                    f"task {self.task.name!r}: {e} (layout: {self.layout.describe}; root {self.root})"
                ) from e
        return self._sources[official]

    def __call__(self, split: str) -> Dataset:
        data = self.uncached(split)
        if split == "train" or self.eval_cache is None:
            return data
        from .eval_cache import cached_eval_split

        h = hashlib.sha256(repr((self.task.name, split, str(self.root.resolve()), self.layout.describe,
                                 repr(data.transform))).encode() + data.indices.tobytes() + data.labels.tobytes())
        return cached_eval_split(data, f"{self.task.name}-{split}-{h.hexdigest()[:16]}", self.eval_cache,
                                 self.num_workers)

    def uncached(self, split: str) -> TaskSplit:
        if split not in ("train", "val", "test"):
            raise KeyError(f"unknown split {split!r}; expected train, val or test")
        if split == "test":
            src = self.source("test")
            return TaskSplit(src, range(len(src.labels)), clip_transform(self.image_size, self.mean, self.std, False))
        src = self.source("train")
        train, val = carve_val(len(src.labels), self.val_fraction, self.max_val, self.seed)
        augment = split == "train" and self.train_augment
        return TaskSplit(src, train if split == "train" else val,
                         clip_transform(self.image_size, self.mean, self.std, augment))
