"""Can the download hosts be reached? One short request per host before anything is fetched."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from .sources import HFSource, Source, TorchvisionSource


class OfflineError(ConnectionError):
    """The hosts a data set comes from cannot be reached; the message says how to lay the data out by hand."""


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: Hub copies come from the local cache, no host is asked."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/" if parts.scheme != "file" else url


def unreachable(url: str, timeout: float) -> str | None:
    """None if the host of `url` answers (any HTTP status counts), else why not; file:// URLs: the file
    exists."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return None if Path(urllib.request.url2pathname(parts.path)).is_file() else "no such file"
    try:
        with urllib.request.urlopen(urllib.request.Request(host_of(url), method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the host answered
    except (urllib.error.URLError, OSError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def source_urls(source: Source, root: Path) -> list[tuple[str, ...]]:
    """The alternative URLs of each file still to download (an archive already under root is not): each
    tuple needs one reachable URL."""
    if isinstance(source, TorchvisionSource):
        return [a.urls for a in source.archives if not (root / a.folder / a.filename).is_file()]
    if isinstance(source, HFSource) and source.local is None and not hf_offline():
        return [(hf_endpoint() + "/",)]
    return []


def check_reachable(sources: dict[str, Source], root: Path, timeout: float) -> dict[str, list[str]]:
    """task -> what could not be reached ('host (why)'), for the tasks whose files no mirror can serve."""
    seen: dict[str, str | None] = {}
    failed: dict[str, list[str]] = {}
    for task, source in sources.items():
        for mirrors in source_urls(source, root):
            why = {}
            for url in mirrors:
                host = host_of(url)
                if host not in seen:
                    seen[host] = unreachable(url, timeout)
                why[host] = seen[host]
            if all(w is not None for w in why.values()):
                failed.setdefault(task, []).extend(f"{h} ({w})" for h, w in why.items()
                                                   if f"{h} ({w})" not in failed.get(task, []))
    return failed
