"""The headline figures in under two minutes (once the default fine-tunes exist): `make bench-quick`.

    python -m fusion_bench.benchmarks.quick [--skip-merge]

Measures, on this machine:
- fine-tuning s/step of tiny_clip on one tiny_eight task, standard and linear (the real fine-tuning stage:
  Lightning, step-indexed batches, seeded augmentation; steps after the first 10 are timed);
- the cached default rerun: `python run.py` in a fresh process with the default store (made first, untimed,
  if absent: about 4 minutes on 2 cores), its wall time and peak RSS;
- the coefficient search alone on the default experiment: 21 separate merges and evaluations (before) against
  the grid that reads each val batch once (after), with the images decoded and the encoder passes of each;
- TIES over eight ViT-B/32-sized task vectors (lazy safetensors, fresh process; fusion_bench.benchmarks.merge);
- evaluation images/s of tiny_clip over the eight test splits.
Writes outputs/bench/quick-<date>.json and prints a table. Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def finetune_speed(mode: str, steps: int = 40, skip: int = 10) -> float:
    """Seconds per fine-tuning step of tiny_clip on `digits` (steps after the first `skip`)."""
    from lightning.pytorch.callbacks import Callback

    from fusion_bench.clip.train import finetune
    from fusion_bench.families import build_family
    from fusion_bench.stages.finetune_workers import one_thread

    class Timer(Callback):
        t0 = None

        def on_train_batch_start(self, trainer, *a):
            if trainer.global_step == skip:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *a):
            self.seconds = time.perf_counter() - self.t0

    with tempfile.TemporaryDirectory() as tmp:
        exp = build_family(_cfg(f"paths.root={tmp}", f"paths.data={ROOT / 'outputs' / 'data'}", f"finetune={mode}",
                                "taskpool.tasks=[digits]", f"model.train.steps={steps}",
                                f"model.train.checkpoint_every={steps}"))
        module = exp.modes.build_mode_model(exp.mode_cfg, exp.encoder)
        timer = Timer()
        with one_thread(exp.cfg):  # as every fine-tune of a run (fusion_bench/stages/finetune_workers.py)
            finetune(module, exp.head("digits"), exp.tasks["digits"], exp.cfg.model.train, exp.cfg.trainer, 0,
                     Path(tmp) / "work", callbacks=[timer])
    return timer.seconds / (steps - skip)


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 2**20


def cached_rerun() -> dict:
    from fusion_bench.families import build_family

    exp = build_family(_cfg())
    made = None
    if not all(exp.checkpoint(t).is_file() for t in exp.cfg.taskpool.tasks):
        print("making the default fine-tunes first (untimed) ...", file=sys.stderr)
        made = round(_timed([sys.executable, "run.py", "stage=finetune"])[0], 1)
    wall, rss = _timed([sys.executable, "run.py"])
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2), "finetunes_made_first_s": made}


class _Counted:
    """A data set that counts the samples read from it."""

    def __init__(self, data, counter: list[int]):
        self.data, self.counter = data, counter

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.counter[0] += 1
        return self.data[i]


def search_cost() -> dict:
    import torch

    from fusion_bench.evaluation.search import GRID
    from fusion_bench.families import build_family
    from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies
    from fusion_bench.stages.finetune import finetuned_state
    from fusion_bench.stages.merge import Method

    torch.set_num_threads(2)
    cfg = _cfg()
    exp, method = build_family(cfg), Method(cfg.method, "standard")
    fts = [finetuned_state(exp, t) for t in exp.tasks]
    counter = [0]
    for task in exp.tasks.values():
        task._cache["val"] = _Counted(task.split("val"), counter)
    n_val = sum(len(task.split("val")) for task in exp.tasks.values())
    out = {"val_images": n_val, "grid": len(GRID)}
    t0 = time.perf_counter()
    before = [merged_accuracies(exp, method(exp.pretrained_state, fts, c), "val") for c in GRID]
    out["before"] = {"wall_s": round(time.perf_counter() - t0, 2), "images_decoded": counter[0],
                     "encoder_passes": counter[0]}
    counter[0] = 0
    t0 = time.perf_counter()
    after = grid_accuracies(exp, method, fts, GRID, "val")
    out["after"] = {"wall_s": round(time.perf_counter() - t0, 2), "images_decoded": counter[0],
                    "encoder_passes": counter[0] * len(GRID)}
    out["max_accuracy_difference"] = max(abs(a[t] - b[t]) for a, b in zip(after, before) for t in a)
    return out


def ties_vit_b32() -> dict:
    from fusion_bench.benchmarks import merge

    cache = ROOT / "outputs" / "bench_merge" / "vit_b32"
    merge.build_checkpoints("vit_b32", cache, 8, 3e-4)
    merge.warm_page_cache([p for ps in merge.checkpoint_paths(cache, 8)[1:] for p in ps])
    r = merge.run_one("ties", cache, 8, 2, "PASSIVE")
    return {"wall_s": round(r["wall_s"], 2), "peak_rss_gib": round(r["rss_gib"], 2)}


def eval_speed() -> dict:
    import torch

    from fusion_bench.clip.model import ImageClassifier
    from fusion_bench.evaluation.accuracy import predictions
    from fusion_bench.families import build_family

    torch.set_num_threads(2)
    exp = build_family(_cfg())
    n, t0 = 0, time.perf_counter()
    for t, task in exp.tasks.items():
        data = task.split("test")
        predictions(ImageClassifier(exp.encoder, exp.head(t)), data, exp.cfg.model.eval_batch_size)
        n += len(data)
    return {"images": n, "images_per_s": round(n / (time.perf_counter() - t0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-merge", action="store_true", help="leave out TIES on ViT-B/32 (needs ~3 GB of disk)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.chdir(ROOT)  # the default store and data caches: outputs/ of the checkout
    t0 = time.perf_counter()
    res = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    res["rerun"] = cached_rerun()  # first: it makes the default fine-tunes the search needs, if absent
    res["finetune_s_per_step"] = {m: round(finetune_speed(m), 4) for m in ("standard", "linear")}
    res["search"] = search_cost()
    res["ties_vit_b32"] = None if args.skip_merge else ties_vit_b32()
    res["eval"] = eval_speed()
    res["total_s"] = round(time.perf_counter() - t0, 1)
    out = ROOT / "outputs" / "bench" / f"quick-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    s = res["search"]
    rows = [
        ("fine-tuning s/step, tiny_clip standard", res["finetune_s_per_step"]["standard"]),
        ("fine-tuning s/step, tiny_clip linear", res["finetune_s_per_step"]["linear"]),
        ("cached default rerun (wall s / peak RSS GiB)", f"{res['rerun']['wall_s']} / {res['rerun']['peak_rss_gib']}"),
        ("search, 21 merges and evaluations (s / images decoded)", f"{s['before']['wall_s']} / {s['before']['images_decoded']}"),
        ("search, grid reading each batch once (s / images decoded)", f"{s['after']['wall_s']} / {s['after']['images_decoded']}"),
        ("TIES, eight ViT-B/32 task vectors (s / peak RSS GiB)",
         "skipped" if res["ties_vit_b32"] is None else f"{res['ties_vit_b32']['wall_s']} / {res['ties_vit_b32']['peak_rss_gib']}"),
        ("evaluation images/s, tiny_clip", res["eval"]["images_per_s"]),
    ]  # fmt: skip
    print(f"| bench-quick {res['date']} ({res['machine']}) | |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"total {res['total_s']} s; written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
