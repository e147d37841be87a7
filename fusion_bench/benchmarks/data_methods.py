"""What the methods that look at data cost on a real-size encoder: per-task statistics (RegMean's Grams, the
diagonal Fisher) and one AdaMerging step over eight task vectors, for ViT-B/32 with random weights and random
224 px images (nothing is downloaded). Each figure comes from a FRESH subprocess: wall time and peak RSS.

    python -m fusion_bench.benchmarks.data_methods [--samples 32] [--json outputs/bench/data_methods.json]

The GPU column is an estimate, not a measurement: the pass's FLOPs (counted by torch.utils.flop_counter for the
forward and backward, plus 2 * tokens * in^2 per linear map for the Grams) at 50% of an H100's 67 TFLOP/s fp32
(statistics are fp32 sums). Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCH = "ViT-B-32-quickgelu"
GPU_FLOPS = 0.5 * 67e12


def _encoder():
    import open_clip
    import torch

    torch.manual_seed(0)
    return open_clip.create_model(ARCH, pretrained=None).visual.eval()


def _images(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 10, (n,), generator=g)


def _gram_flops(encoder) -> float:
    """2 * tokens * in^2 for every linear map's Gram, per image (50 tokens, the pooled token for proj)."""
    tokens = (224 // 32) ** 2 + 1
    width = encoder.conv1.out_channels
    per_block = 3 * width**2 + (4 * width) ** 2  # in_proj, out_proj, c_fc (width in) and c_proj (4 width in)
    return 2.0 * (tokens * per_block * len(encoder.transformer.resblocks) + width**2)


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def worker(kind: str, samples: int, threads: int) -> dict:
    import torch

    from fusion_bench.clip.model import ImageClassifier
    from fusion_bench.statistics import diagonal_fisher, input_grams

    torch.set_num_threads(threads)
    enc = _encoder()
    x, y = _images(samples)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, samples, 16)]
    head = torch.nn.functional.normalize(torch.randn(10, enc.output_dim), dim=-1) * 100
    t0 = time.perf_counter()
    if kind == "gram":
        grams, _ = input_grams(enc, batches, forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]))
        n_out = len(grams)
        with torch.no_grad():
            flops = _count(lambda: enc(x[:1])) + _gram_flops(enc)
    elif kind == "fisher":
        clf = ImageClassifier(enc, head)
        keys = [n for n, p in clf.named_parameters() if p.is_floating_point()]
        fisher, _ = diagonal_fisher(clf, batches, keys=keys)
        n_out = len(fisher)

        def fwd_bwd():
            clf.zero_grad()
            torch.nn.functional.cross_entropy(clf(x[:1]), y[:1]).backward()

        flops = _count(fwd_bwd)
    else:
        raise ValueError(kind)
    wall = time.perf_counter() - t0
    return {"kind": kind, "samples": samples, "wall_s": wall, "s_per_sample": wall / samples, "tensors": n_out,
            "gflops_per_sample": flops / 1e9, "gpu_estimate_s_per_256": 256 * flops / GPU_FLOPS,
            "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def adamerging_worker(steps: int, threads: int, n_tasks: int = 8) -> dict:
    import torch
    from torch.func import functional_call

    from fusion_bench.benchmarks import merge
    from fusion_bench.merging.adamerging import adamerging
    from fusion_bench.models.heads import head_logits
    from fusion_bench.store import load_safetensors

    torch.set_num_threads(threads)
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cache = ROOT / "outputs" / "bench_merge" / "vit_b32"
    merge.build_checkpoints("vit_b32", cache, n_tasks, 3e-4)
    pre_path, ft_paths = merge.checkpoint_paths(cache, n_tasks)
    pre = load_safetensors(pre_path)
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    tvs = []
    for p in ft_paths:  # one fine-tune in memory at a time: only the task vectors stay
        ft = load_safetensors(p)
        tvs.append({k: ft[k].float() - pre[k].float() for k in keys})
        del ft
    encoder_gib = sum(pre[k].numel() * 4 for k in keys) / 2**30
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    enc = _encoder()
    enc.load_state_dict(pre)
    enc.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    heads = [torch.nn.functional.normalize(torch.randn(10, enc.output_dim, generator=g), dim=-1) * 100
             for _ in range(n_tasks)]
    data = [_images(16, seed=t)[0] for t in range(n_tasks)]
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step, loss, coefs):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    adamerging(pre, tvs, lambda w, t, x: head_logits(functional_call(enc, w, (x,)), heads[t]),
               lambda step, t: data[t], layer_wise=True, steps=steps, keys=keys, on_step=tick,
               batches_per_task=1)  # the cost of one batch of 16 per task (the default step takes 2)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"kind": "adamerging_layer_wise", "tasks": n_tasks, "batch_per_task": 16, "steps": steps,
            "s_per_step": min(times[1:] or times), "first_step_s": times[0], "rss_gib": rss,
            "rss_after_import_gib": rss_import, "rss_before_adamerging_gib": rss_inputs, "encoder_fp32_gib": encoder_gib,
            "bound_gib": (n_tasks + 4) * encoder_gib}


def run_one(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fusion_bench.benchmarks.data_methods", *args], check=False,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "data_methods.json")
    ap.add_argument("--worker", choices=["gram", "fisher", "adamerging"])
    a = ap.parse_args()
    if a.worker == "adamerging":
        print(json.dumps(adamerging_worker(a.steps, a.threads)))
        return
    if a.worker:
        print(json.dumps(worker(a.worker, a.samples, a.threads)))
        return
    common = ["--samples", str(a.samples), "--steps", str(a.steps), "--threads", str(a.threads)]
    rows = []
    for k in ("gram", "fisher", "adamerging"):  # each in a fresh process (its own peak RSS)
        print(f"{k}: building a random ViT-B/32 and 224 px images, then timing {a.samples} samples"
              if k != "adamerging" else f"adamerging: timing {a.steps} layer-wise steps over eight tasks", flush=True)
        rows.append(run_one(["--worker", k, *common]))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1))
    print("| statistic (ViT-B/32, 224 px) | CPU s/sample | peak RSS (GiB) | GFLOP/sample | GPU estimate, 256 samples |")
    print("|---|---:|---:|---:|---:|")
    for r in rows[:2]:
        print(f"| {r['kind']} | {r['s_per_sample']:.3f} | {r['rss_gib']:.2f} | {r['gflops_per_sample']:.1f} | "
              f"{r['gpu_estimate_s_per_256']:.2f} s |")
    r = rows[2]
    print(f"\nAdaMerging layer-wise, {r['tasks']} tasks x {r['batch_per_task']} images: {r['s_per_step']:.1f} s/step, "
          f"peak RSS {r['rss_gib']:.2f} GiB (after import {r['rss_after_import_gib']:.2f}, with theta_0 and the task "
          f"vectors {r['rss_before_adamerging_gib']:.2f}; (n_tasks + 4) x encoder = {r['bound_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
