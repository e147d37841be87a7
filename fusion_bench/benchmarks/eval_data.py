"""Evaluation data throughput: JPEG decoding + open_clip's eval transform every time vs the uint8 eval cache.

    python -m fusion_bench.benchmarks.eval_data [--images 1000] [--size 500x375] [--workers 0 2]

Writes --images random-texture JPEGs (SUN397's typical 500x375 by default) as an image-folder copy of DTD in a
temporary folder, loads its test split through the real task pool (taskpool=eight_tasks) with cache_eval off and
on, and times one full pass of a DataLoader (batch 256) over each: images/s, and for the cache the one-time
build. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_jpegs(root: Path, n: int, size: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", n)):
        for i in range(count):
            folder = root / "dtd" / split / ("banded" if i % 2 else "zigzagged")
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            Image.fromarray(noise).resize(size, Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)


def one_pass(dataset, workers: int) -> float:
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=256, num_workers=workers):
        pass
    return len(dataset) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", default="500x375")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    import torch
    from omegaconf import OmegaConf
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from fusion_bench.data.tasks import load_task

    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "data", args.images, (w, h))
        rows = []
        for cache in (False, True):
            pool = OmegaConf.create({"name": "eight_tasks", "source": "eight_tasks", "data_root": str(tmp / "data"),
                                     "tasks": ["dtd"], "cache_eval": cache, "num_workers": max(args.workers)})
            task = load_task(pool, "dtd", OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, tmp / "cache", image_size=224)
            t0 = time.perf_counter()
            test = task.split("test")
            build = time.perf_counter() - t0
            for workers in args.workers:
                rows.append((cache, workers, one_pass(test, workers), build if cache else None))
    print(f"{args.images} JPEGs of {w}x{h}, image size 224, batch 256, torch threads 1\n", file=sys.stderr)
    print("| eval data | DataLoader workers | images/s | one-time build |\n|---|---:|---:|---:|")
    for cache, workers, rate, build in rows:
        built = "" if build is None else f"{build:.1f} s (workers {max(args.workers)})"
        print(f"| {'uint8 cache' if cache else 'decode every pass'} | {workers} | {rate:.0f} | {built} |")


if __name__ == "__main__":
    main()
