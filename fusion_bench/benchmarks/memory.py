"""Host memory of a real-size run on this machine: the real model path (an open_clip state dict with random
weights), fixture copies of all eight data sets in their on-disk formats, 2 training steps, the full 21-point
coefficient search. Each command runs in a fresh process; its peak RSS is the kernel's (wait4 ru_maxrss), and the
run's own log gives the RSS after each stage.

    python -m fusion_bench.benchmarks.memory --arch vit_b32 vit_l14 [--methods task_arithmetic adamerging ...]
    make bench-memory      (ViT-B/32 with every --methods row, ViT-L/14 with task arithmetic)

    stage=all       python run.py model=<arch> taskpool=eight_tasks model.pretrained=FILE paths.data_root=DIR
                    model.train.steps=2 model.train.batch_size=2  (from an empty store)
    stage=evaluate  the same with the fine-tunes cached: the merges, the references and the search
    --methods       more stage=evaluate rows over the same fine-tunes: the methods that learn coefficients
                    (adamerging, 2 steps of batch 2) or weigh task vectors by statistics (fisher_merging,
                    regmean; 4 samples per task), which hold per-task tensors the search does not

Not a test. The fixtures come from tests/fixtures (run it from a checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {"vit_b32": "ViT-B-32-quickgelu", "vit_l14": "ViT-L-14-quickgelu"}
METHODS = {  # stage=evaluate overrides: few steps and samples (memory does not grow with them, time does)
    "task_arithmetic": [],
    "adamerging": ["method=adamerging", "method.coefficients.steps=2", "method.coefficients.batch_size=2"],
    "fisher_merging": ["method=fisher_merging", "method.statistics.num_samples=4", "method.statistics.batch_size=2"],
    "regmean": ["method=regmean", "method.statistics.num_samples=4", "method.statistics.batch_size=2"],
}


def build(arch: str, work: Path) -> tuple[Path, Path]:
    """A whole CLIP with random weights as open_clip's state dict (safetensors), and the eight fixture data sets."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import eight_tasks_data as fx

    weights, data = work / f"{arch}-random.safetensors", work / "data_root"
    work.mkdir(parents=True, exist_ok=True)
    if not weights.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(ARCHS[arch], pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
    if not (data / ".complete").is_file():
        fx.write_mnist(data / "mnist")
        fx.write_svhn(data / "svhn")
        fx.write_gtsrb(data)
        fx.write_dtd(data)
        fx.write_eurosat(data)
        fx.write_cars(data / "cars")
        fx.write_sun397(data / "sun397")
        fx.write_resisc45(data / "resisc45")
        (data / ".complete").touch()
    return weights, data


def measure(cmd: list[str], log: Path) -> dict:
    """Wall seconds, peak RSS (GiB, the kernel's) and the per-stage RSS lines of one run in a fresh process."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-4000:]}")
    stages = re.findall(r"memory after (\S+): RSS ([\d.]+) GiB", text)
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "rss_after": {name: float(v) for name, v in stages}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["vit_b32", "vit_l14"], choices=list(ARCHS))
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic"], choices=list(METHODS),
                    help="stage=evaluate rows (stage=all runs task arithmetic)")
    ap.add_argument("--tasks", default="sun397,cars,resisc45,eurosat,svhn,gtsrb,mnist,dtd")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_memory")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "memory.json")
    a = ap.parse_args()
    rows = []
    for arch in a.arch:
        work = a.work / arch
        weights, data = build(arch, work)
        root = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        base = [sys.executable, "run.py", f"model={arch}", "taskpool=eight_tasks", f"taskpool.tasks=[{a.tasks}]",
                f"model.pretrained={weights}", f"paths.data_root={data}", f"paths.root={root}",
                "model.train.steps=2", "model.train.batch_size=2", "model.train.warmup_steps=1"]
        for stage, method in [("all", "task_arithmetic")] + [("evaluate", m) for m in a.methods]:
            r = measure([*base, f"stage={stage}", *METHODS[method]], work / f"{root.name}-{stage}-{method}.log")
            rows.append({"arch": arch, "tasks": len(a.tasks.split(",")), "stage": stage, "method": method, **r})
            print(f"{arch} stage={stage} {method}: peak RSS {r['peak_rss_gib']:.2f} GiB, {r['wall_s']:.0f} s",
                  file=sys.stderr)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1))
    print("| model | tasks | stage | method | peak RSS (GiB) | wall |\n|---|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['tasks']} | {r['stage']} | {r['method']} | {r['peak_rss_gib']:.2f} | "
              f"{int(r['wall_s'] // 60)}:{int(r['wall_s'] % 60):02d} |")


if __name__ == "__main__":
    main()
