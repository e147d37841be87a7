"""Hugging Face `datasets` copies of a data set on disk (optional dependency: pip install 'fusion_bench[hf]').

Two layouts: a `DatasetDict.save_to_disk` folder (dataset_dict.json and one folder per split) and the parquet files
of a Hub snapshot (data/<split>-*.parquet, <split>-*.parquet or <split>/*.parquet). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def hf_splits(root: Path) -> dict[str, list[Path]]:
    """The splits of a Hugging Face copy in root, {} if it is none: a DatasetDict.save_to_disk folder (split ->
    [its folder]) or the parquet files of a Hub snapshot, data/<split>-*.parquet, <split>-*.parquet or
    <split>/*.parquet (split -> files)."""
    if (root / "dataset_dict.json").is_file():
        try:
            names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{root / 'dataset_dict.json'} is not a datasets DatasetDict index "
                             f"(expected JSON with a 'splits' list): {e}") from None
        return {s: [root / s] for s in names}
    for pattern in ("data/*.parquet", "*.parquet", "*/*.parquet"):
        found: dict[str, list[Path]] = {}
        for f in sorted(root.glob(pattern)):
            found.setdefault(f.parent.name if pattern == "*/*.parquet" else f.stem.split("-")[0], []).append(f)
        if found:
            return found
    return {}


def load_hf_split(root: Path, split: str, files: list[Path]):
    """One split of a Hugging Face copy as a memory-mapped `datasets.Dataset`; nothing is downloaded. Parquet files
    are converted to arrow once, cached in <root>/.hf_cache (the `datasets` cache if root is read-only)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{root} holds a Hugging Face `datasets` copy; reading it needs the datasets library: "
                          f"pip install 'fusion_bench[hf]' (or pip install 'datasets>=3')") from e
    if (root / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(root / split))
    cache = root / ".hf_cache" if os.access(root, os.W_OK) else None
    if cache is None:
        log.info("%s is read-only: caching its parquet files as arrow in the datasets cache", root)
    return datasets.Dataset.from_parquet([str(f) for f in files], split=split,
                                         cache_dir=None if cache is None else str(cache))
