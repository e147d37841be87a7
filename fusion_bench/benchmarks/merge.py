"""Merge-engine benchmark: wall time and peak RSS per method over safetensors checkpoints.

    python -m fusion_bench.benchmarks.merge --arch vit_b32 [--methods task_arithmetic ties awd_ta] [--write]

Builds (once, cached in ``outputs/bench_merge/<arch>/``) a randomly initialised open_clip image
encoder (nothing is downloaded) and eight "fine-tuned" copies: theta_t = theta_0 + sigma * (0.5 c + z_t)
with seeded gaussians (a shared component c makes the task vectors correlated, pairwise cosine ~0.2,
like real ones).  Each method then runs in a FRESH subprocess that opens the files as
``LazyStateDict`` and merges; the subprocess reports the merge wall time and its peak RSS
(``ru_maxrss``: interpreter + torch + merge).  Files are read once before timing (warm page cache).
Not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {"vit_b32": "ViT-B-32-quickgelu", "vit_l14": "ViT-L-14-quickgelu"}
# Every method of the table (fusion_bench/merging/registry.py) that merges a model without data or a fine-tuning
# mode of its own (kinds data-free and task-specific, no `modes`), once per function and settings (an alias such
# as awd = awd_ta runs once), with its conf/method/<name>.yaml settings; a setting chosen on val ("search") takes
# the function's default (scaling_coef 0.3, or 1.0 for Iso-C/CTS, 0.5 for MagMax; TALL lambdas 0.4).
# Task-specific methods build the TaskSpecificMerge (shared vector, masks) only. Read with `methods()` (or
# `METHODS`, `DEFAULT_METHODS`): it imports torch, which the driver process does not (see main).
VARIANTS: dict[str, tuple[str, dict, bool]] = {  # name -> (config, settings over the config's, in the default run)
    "ties_per_tensor": ("ties", {"per_tensor": True}, True),
    "wudi_30_steps": ("wudi", {"iterations": 30}, False),  # per-step cost (ViT-L/14: 30 of 300 steps)
    "wudi_exact": ("wudi", {"solver": "exact"}, True),  # the loss's minimiser instead of 300 Adam steps
}
BENCH_KINDS = ("data-free", "task-specific")


def config_settings(name: str, function) -> dict:
    """conf/method/<name>.yaml's settings for `function`; "search" -> the function's default."""
    import inspect

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml"))
    params = inspect.signature(function).parameters
    return {k: params[k].default if v == "search" else v for k, v in cfg.items() if not k.startswith("_")}


@functools.cache
def methods() -> dict[str, tuple[str, str, dict]]:
    """bench name -> (config name, function name, settings): see VARIANTS and the comment above it."""
    from fusion_bench.merging.registry import methods as table

    rows, seen = {}, set()
    for name, spec in table().items():  # declaration order: an alias comes after its first name
        if spec.kind not in BENCH_KINDS or spec.modes is not None:
            continue
        settings = config_settings(name, spec.function)
        key = (spec.target, json.dumps(settings, sort_keys=True))
        if key not in seen:
            seen.add(key)
            rows[name] = (name, spec.function.__name__, settings)
    for variant, (name, extra, _) in VARIANTS.items():
        rows[variant] = (name, rows[name][1], {**rows[name][2], **extra})
    return dict(sorted(rows.items()))


def __getattr__(name: str):
    if name == "METHODS":  # bench name -> (function name in fusion_bench.merging, settings)
        return {k: (fn, kw) for k, (_, fn, kw) in methods().items()}
    if name == "DEFAULT_METHODS":
        return [k for k in methods() if VARIANTS.get(k, (None, None, True))[2]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checkpoint_paths(cache: Path, n_tasks: int) -> tuple[Path, list[Path]]:
    return cache / "pretrained.safetensors", [cache / f"task{t}.safetensors" for t in range(n_tasks)]


def build_checkpoints(arch: str, cache: Path, n_tasks: int, sigma: float) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    pre_path, ft_paths = checkpoint_paths(cache, n_tasks)
    stamp = cache / "params.json"
    params = {"arch": arch, "n_tasks": n_tasks, "sigma": sigma, "version": 1}
    if (
        stamp.exists()
        and json.loads(stamp.read_text()) == params
        and all(p.exists() for p in [pre_path, *ft_paths])
    ):
        size = sum(p.stat().st_size for p in [pre_path, *ft_paths]) / 2**30
        print(f"inputs: {n_tasks} + 1 checkpoints of {ARCHS[arch]} cached in {cache} ({size:.1f} GiB on disk, kept "
              f"for the next run; delete the folder to free it)", file=sys.stderr)
        return
    cache.mkdir(parents=True, exist_ok=True)
    per_model = {"vit_b32": 0.35, "vit_l14": 1.2}.get(arch)  # fp32 image towers, GiB
    about = f" (about {per_model * (n_tasks + 1):.1f} GiB, kept for the next run)" if per_model else ""
    print(f"building {n_tasks} + 1 checkpoints of {ARCHS[arch]} in {cache}{about} ...", file=sys.stderr)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCHS[arch], pretrained=None).visual
    pre = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model

    def save(sd: dict, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file(sd, tmp)
        os.replace(tmp, path)

    save(pre, pre_path)
    for t, path in enumerate(ft_paths):
        gc = torch.Generator().manual_seed(12345)  # shared component: same stream for every task
        gt = torch.Generator().manual_seed(1000 + t)
        ft = {}
        for k, v in pre.items():
            if not v.is_floating_point():
                ft[k] = v
                continue
            noise = torch.randn(v.shape, generator=gc).mul_(0.5)
            noise.add_(torch.randn(v.shape, generator=gt)).mul_(sigma)
            ft[k] = (v + noise).to(v.dtype)
        save(ft, path)
        del ft
        print(f"  wrote {path.name}", file=sys.stderr)
    stamp.write_text(json.dumps(params))


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def worker(method: str, cache: Path, n_tasks: int, threads: int) -> None:
    """Runs inside the fresh subprocess: one merge, then a JSON line on stdout."""
    import logging

    import torch

    torch.set_num_threads(threads)
    import fusion_bench.merging as fm

    notes: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    logging.getLogger("fusion_bench.merging").addHandler(Grab())
    logging.getLogger("fusion_bench.merging").setLevel(logging.INFO)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    from fusion_bench.merging.registry import methods as table

    config, _, kwargs = methods()[method]
    fn = table()[config].function
    pre_path, ft_paths = checkpoint_paths(cache, n_tasks)
    t0 = time.perf_counter()
    pre = fm.LazyStateDict(pre_path)
    fts = [fm.LazyStateDict(p) for p in ft_paths]
    merged = fn(pre, fts, **kwargs)
    wall = time.perf_counter() - t0
    if hasattr(merged, "task_weights"):  # task-specific result (TaskSpecificMerge): merged float parameters
        n_params = merged.n_params
    else:
        n_params = sum(v.numel() for v in merged.values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    print(json.dumps({"method": method, "wall_s": wall, "rss_gib": rss, "vmhwm_gib": hwm, "rss_after_import_gib": rss0,
                      "n_params": n_params, "notes": notes, "torch": torch.__version__}))  # fmt: skip


def _env(omp_wait_policy: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def run_one(method: str, cache: Path, n_tasks: int, threads: int, omp_wait_policy: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--cache-dir", str(cache), "--n-tasks", str(n_tasks),
           "--threads", str(threads)]  # fmt: skip
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=_env(omp_wait_policy), cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| method | wall time (s) | peak RSS (GiB) |", "|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['wall_s']:.2f} | {r['rss_gib']:.2f} |" for r in rows]
    return "\n".join(lines)


def write_results(path: Path, arch: str, header: str, body: str) -> None:
    """Replace (or add) this arch's section of the results file."""
    title = f"## {arch}"
    sections: dict[str, str] = {}
    preamble = "# Merge benchmark (fusion_bench/benchmarks/merge.py)\n"
    if path.exists():
        text = path.read_text()
        parts = text.split("\n## ")
        preamble = parts[0].rstrip() + "\n"
        for part in parts[1:]:
            name = "## " + part.split("\n", 1)[0]
            sections[name] = "## " + part.rstrip() + "\n"
    sections[title] = f"{title}\n\n{header}\n\n{body}\n"
    out = preamble + "\n" + "\n".join(sections[k] for k in sorted(sections))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(out)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit_b32")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method of the table (see METHODS)")
    ap.add_argument("--n-tasks", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=3e-4, help="per-entry std of the synthetic task vectors")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each merge subprocess")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the merge subprocess ('' = inherit). With the default ACTIVE policy, 2 torch "
        "threads on a 2-core machine shared with other jobs spin-wait and run 10-20x slower",
    )
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the table shows the fastest")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default outputs/bench_merge/<arch>")
    ap.add_argument("--write", action="store_true", help="write the table into outputs/bench_merge/RESULTS.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--list", action="store_true", help="print the methods (JSON: name -> [function, settings])")
    ap.add_argument("--list-defaults", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cache = args.cache_dir or ROOT / "outputs" / "bench_merge" / args.arch
    if args.worker:
        worker(args.worker, cache, args.n_tasks, args.threads)
        return
    if args.list or args.list_defaults:
        print(json.dumps(__getattr__("METHODS") if args.list else __getattr__("DEFAULT_METHODS")))
        return
    # the method names come from a subprocess: the table imports torch, and this driver stays small
    # (ru_maxrss is inherited across fork + exec)
    listed = [sys.executable, __file__, "--list-defaults" if args.methods is None else "--list"]
    names = json.loads(subprocess.run(listed, check=True, capture_output=True, text=True, env=_env(""),
                                      cwd=ROOT).stdout.strip().splitlines()[-1])
    if args.methods is None:
        args.methods = names
    elif unknown := [m for m in args.methods if m not in names]:
        ap.error(f"--methods: unknown {unknown}; choose from {sorted(names)}")
    if args.build_only:
        build_checkpoints(args.arch, cache, args.n_tasks, args.sigma)
        return
    # build in a subprocess: ru_maxrss is inherited across fork + exec, so the driver stays small
    subprocess.run(
        [sys.executable, __file__, "--build-only", "--arch", args.arch, "--cache-dir", str(cache),
         "--n-tasks", str(args.n_tasks), "--sigma", str(args.sigma)],
        check=True, env=_env(""), cwd=ROOT,
    )  # fmt: skip
    pre_path, ft_paths = checkpoint_paths(cache, args.n_tasks)
    warm_page_cache([pre_path, *ft_paths])
    load0 = os.getloadavg()[0]
    rows = []
    for method in args.methods:
        runs = [
            run_one(method, cache, args.n_tasks, args.threads, args.omp_wait_policy)
            for _ in range(args.repeat)
        ]
        best = min(runs, key=lambda r: r["wall_s"])
        best["rss_gib"] = max(r["rss_gib"] for r in runs)
        rows.append(best)
        print(f"{method}: {best['wall_s']:.2f} s, ru_maxrss {best['rss_gib']:.2f} GiB, VmHWM {best['vmhwm_gib']:.2f} GiB, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)  # fmt: skip
        for note in best["notes"]:
            print(f"    {note}", file=sys.stderr)
    n_params = rows[0]["n_params"] if rows else 0
    torch_version = rows[0]["torch"] if rows else "?"
    header = (
        f"{args.n_tasks} task vectors of a {ARCHS[args.arch]} image encoder ({n_params / 1e6:.1f}M parameters, "
        f"fp32 safetensors, {args.n_tasks + 1} x {pre_path.stat().st_size / 2**20:.0f} MiB), merged from "
        f"`LazyStateDict`s in a fresh process per method; torch {torch_version}, {args.threads} threads "
        f"(OMP_WAIT_POLICY={args.omp_wait_policy or 'inherited'}), "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {load0:.1f} at start, "
        f"warm page cache, best of {args.repeat}. Peak RSS = `ru_maxrss` of the whole process "
        f"(interpreter + torch ~{rows[0]['rss_after_import_gib'] if rows else 0:.2f} GiB + merge + output)."
    )
    body = table(rows)
    print(f"\n{header}\n\n{body}")
    if args.write:
        write_results(ROOT / "outputs" / "bench_merge" / "RESULTS.md", args.arch, header, body)


if __name__ == "__main__":
    main()
