"""Downloading: torchvision's archives (md5-checked, unpacked in place) and Hugging Face `datasets` copies
(saved with DatasetDict.save_to_disk into a staging folder that the caller renames into place)."""

from __future__ import annotations

import logging
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from fusion_bench.store import atomic_write

from .sources import Archive, HFSource, TorchvisionSource

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A download failed; the message names the source and what was tried."""


def _copy_local(url: str, path: Path, md5: str) -> None:
    """A file:// mirror (e.g. a shared file system): copied atomically, its md5 checked like a download."""
    from torchvision.datasets.utils import check_integrity

    src = Path(urllib.request.url2pathname(urlsplit(url).path))
    if not src.is_file():
        raise FileNotFoundError(f"no such file {src}")
    atomic_write(path, lambda tmp: shutil.copyfile(src, tmp))
    if not check_integrity(str(path), md5):
        path.unlink()
        raise RuntimeError(f"{src} does not have the md5 {md5}")


def fetch_archive(archive: Archive, root: Path) -> Path:
    """Download one archive into <root>/<folder> (kept if it is there with the right md5), then unpack it."""
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    folder = root / archive.folder
    path = folder / archive.filename
    errors = []
    for url in archive.urls:
        try:
            if check_integrity(str(path), archive.md5):
                log.info("%s is already there (md5 %s)", path, archive.md5)
            elif url.startswith("file:"):
                folder.mkdir(parents=True, exist_ok=True)
                _copy_local(url, path, archive.md5)
            else:  # torchvision's downloader: redirects, https -> http fallback, md5 check
                download_url(url, str(folder), filename=archive.filename, md5=archive.md5)
            break
        except (urllib.error.URLError, OSError, RuntimeError) as e:  # RuntimeError: a wrong md5
            errors.append(f"{url}: {type(e).__name__}: {e}")
    else:
        raise FetchError(f"could not download {archive.filename}:\n  " + "\n  ".join(errors))
    if archive.extract:
        log.info("unpacking %s", path)
        extract_archive(str(path), str(folder))
    return path


def fetch_torchvision(source: TorchvisionSource, root: Path) -> list[Path]:
    """Every archive of the source; returns the files (the caller may delete them once verified)."""
    return [fetch_archive(a, root) for a in source.archives]


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("fetching Hugging Face copies needs the datasets library: "
                          "pip install 'fusion_bench[hf]' (or pip install 'datasets>=3')") from e
    return datasets


def load_hf_split(source: HFSource, split: str, cache_dir: str | None):
    """One split of the source: a local save_to_disk folder, a local folder `datasets.load_dataset` reads, or
    a Hub id."""
    datasets = _datasets()
    local = source.local
    if local is not None:
        if (local / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(local))
            if split not in dd:
                raise FetchError(f"{local} has the splits {sorted(dd)}; expected {split!r}")
            return dd[split]
        return datasets.load_dataset(str(local), split=split, cache_dir=cache_dir)
    return datasets.load_dataset(source.dataset, source.config, split=split, cache_dir=cache_dir)


def fetch_hf(source: HFSource, staging: Path, cache_dir: str | None) -> Path:
    """The source's splits as one DatasetDict.save_to_disk folder at `staging` (which must not exist)."""
    datasets = _datasets()
    splits = {s: load_hf_split(source, s, cache_dir) for s in source.splits}
    log.info("writing %s (%s)", staging, ", ".join(f"{s}: {len(d)}" for s, d in splits.items()))
    datasets.DatasetDict(splits).save_to_disk(str(staging))
    return staging
