"""Where each data set is fetched from: torchvision's download URLs (and md5s) or a Hugging Face `datasets`
copy.

The archive URLs and md5s are those of torchvision 0.29's classes (MNIST.mirrors / resources, SVHN.split_list,
GTSRB.download, EuroSAT.download, DTD._URL / _MD5); each archive is unpacked where that class's
`download=True` would unpack it, which is the layout fusion_bench/data/eight_tasks.py reads. SUN397
(torchvision's archive is 37 GB and lacks the partition files), Stanford Cars (no working official download)
and RESISC45 (no torchvision class) come from Hugging Face copies; GLUE from the Hub's nyu-mll/glue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Archive:
    """One file to download (trying each mirror in turn) into <data root>/<folder> and, if `extract`, unpack
    there."""

    urls: tuple[str, ...]
    md5: str
    folder: str
    extract: bool = True

    @property
    def filename(self) -> str:
        return Path(urlsplit(self.urls[0]).path).name


@dataclass(frozen=True)
class TorchvisionSource:
    dataset: str  # the torchvision class whose download this repeats (for messages)
    archives: tuple[Archive, ...]

    def describe(self) -> str:
        return f"torchvision {self.dataset} ({', '.join(a.filename for a in self.archives)})"


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face `datasets` copy: a Hub id (with `config`, e.g. GLUE's task) or a local folder (a
    DatasetDict.save_to_disk folder, or parquet / image files `datasets.load_dataset` reads); `splits` are
    kept."""

    dataset: str
    splits: tuple[str, ...]
    config: str | None = None

    @property
    def local(self) -> Path | None:
        path = Path(self.dataset).expanduser()
        return path if path.exists() else None

    def describe(self) -> str:
        return f"{'local copy' if self.local else 'Hugging Face'} {self.dataset}" + (
            f" ({self.config})" if self.config and not self.local else "")


Source = TorchvisionSource | HFSource

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_GTSRB = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
_EUROSAT = ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
            "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip")


def _mnist(name: str, md5: str) -> Archive:
    return Archive(tuple(m + name for m in _MNIST_MIRRORS), md5, "mnist/MNIST/raw")


EIGHT_TASKS: dict[str, Source] = {
    "sun397": HFSource("tanganke/sun397", ("train", "test")),
    "cars": HFSource("tanganke/stanford_cars", ("train", "test")),
    "resisc45": HFSource("tanganke/resisc45", ("train", "test")),
    "eurosat": TorchvisionSource("EuroSAT", (
        Archive((_EUROSAT,), "c8fa014336c82ac7804f0398fcb19387", "eurosat"),)),
    "svhn": TorchvisionSource("SVHN", tuple(
        Archive((f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat",), md5, "svhn", extract=False)
        for split, md5 in (("train", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                           ("test", "eb5a983be6a315427106f1b164d9cef3")))),
    "gtsrb": TorchvisionSource("GTSRB", (
        Archive((f"{_GTSRB}GTSRB-Training_fixed.zip",), "513f3c79a4c5141765e10e952eaa2478", "gtsrb"),
        Archive((f"{_GTSRB}GTSRB_Final_Test_Images.zip",), "c7e4e6327067d32654124b0fe9e82185", "gtsrb"),
        Archive((f"{_GTSRB}GTSRB_Final_Test_GT.zip",), "fe31e9c9270bbcd7b84b7f21a9d9d9e5", "gtsrb"),
    )),
    "mnist": TorchvisionSource("MNIST", (
        _mnist("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _mnist("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        _mnist("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        _mnist("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    )),
    "dtd": TorchvisionSource("DTD", (
        Archive(("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
                "fff73e5086ae6bdbea199a49dfb8a4c1", "dtd"),)),
}

GLUE_HUB_ID = "nyu-mll/glue"


def glue_source(task: str, dataset: str = GLUE_HUB_ID) -> HFSource:
    """GLUE task `task` (the Hub config of that name): train and the dev split the loader reads."""
    from fusion_bench.data.glue import TASKS

    return HFSource(dataset, ("train", TASKS[task].hf_dev), config=task)
