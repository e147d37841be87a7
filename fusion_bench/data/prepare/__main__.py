"""python -m fusion_bench.data.prepare eight_tasks|glue --root DIR (fusion_bench/data/prepare/__init__.py)."""

from __future__ import annotations

import argparse
import logging
import sys

import fusion_bench.data.prepare as package

from . import PrepareError, prepare
from .network import OfflineError


def _hf_pairs(values: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for v in values:
        task, sep, source = v.partition("=")
        if not sep or not task or not source:
            parser.error(f"--hf {v!r}: expected TASK=HUB_ID_OR_FOLDER, e.g. --hf dtd=tanganke/dtd")
        out[task] = source
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_bench.data.prepare",
                                     description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["eight_tasks", "glue"])
    parser.add_argument("--root", default="~/data", help="the data root (paths.data_root; default ~/data)")
    parser.add_argument("--tasks", default=None, help="a subset, e.g. mnist,svhn (default: all)")
    parser.add_argument("--hf", action="append", default=[], metavar="TASK=SOURCE",
                        help="take TASK from this Hugging Face Hub id or local copy (repeatable)")
    parser.add_argument("--hf-cache", default=None, help="the datasets cache folder (default: HF's own)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per host to answer")
    parser.add_argument("--keep-archives", action="store_true", help="keep the archives after unpacking")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    try:
        prepare(args.benchmark, args.root, tasks, _hf_pairs(args.hf, parser), args.hf_cache, args.timeout,
                args.keep_archives)
    except OfflineError as e:
        logging.getLogger("fusion_bench.data.prepare").error("%s", e)
        return 2
    except (PrepareError, ValueError) as e:
        logging.getLogger("fusion_bench.data.prepare").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
