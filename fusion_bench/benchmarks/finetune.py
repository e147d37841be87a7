"""Fine-tuning throughput per mode: images/s, s/step, peak memory and FLOPs per image of a real-size CLIP encoder.

    python -m fusion_bench.benchmarks.finetune --arch vit_b32 [--modes standard linear ...] [--steps 200]

Each mode runs in a FRESH subprocess (clean peak-memory figures) through the same LightningModule and Trainer
settings the fine-tuning stage uses (`ClassifierFinetune`, AdamW, cosine schedule, step-indexed batches), on a
randomly initialised open_clip encoder (nothing is downloaded) and random images held in memory, so the figure is
the model's speed, not the data loader's: real data adds JPEG decoding and augmentation, which need enough
DataLoader workers to keep up. The first `--warmup` steps (cuDNN autotuning, allocator growth) are not timed.

Defaults: on a GPU `--precision bf16-mixed --batch-size 128 --steps 200` (the papers' ViT-B/32 setting); on a CPU
`--precision 32 --batch-size 16 --steps 8`. FLOPs are counted with torch.utils.flop_counter over one training
step (forward + backward) and divided by the batch size. Evaluation throughput is timed through the pipeline's own
`predictions` (no_grad, the trainer's precision as autocast) over the mode's own forward: linear and L-LoRA
evaluate through the linearized forward, LoRA folds its adapters into plain weights (standard's speed). The
table ends with what the figures imply for one task's fine-tune (model.train.steps x model.train.batch_size of
the model config). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {"vit_b32": "ViT-B-32-quickgelu", "vit_b16": "ViT-B-16-quickgelu", "vit_l14": "ViT-L-14-quickgelu",
         "tiny_clip": "tiny-clip"}
MODES = ["standard", "linear", "attention", "linear_layers", "lora", "l_lora"]


def _random_images(n: int, size: int, num_classes: int):
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(num_classes, (n,), generator=g))


def worker(arch: str, mode: str, args: argparse.Namespace) -> dict:
    """Runs inside the fresh subprocess: one short fine-tune, then a JSON line on stdout."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from fusion_bench.clip.model import ImageClassifier, create_clip  # registers tiny-clip with open_clip
    from fusion_bench.clip.train import ClassifierFinetune
    from fusion_bench.evaluation.accuracy import predictions
    from fusion_bench.models.modes import build_mode_model

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    torch.manual_seed(0)
    encoder = create_clip(arch).visual
    size = encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size
    module = build_mode_model(OmegaConf.load(ROOT / "conf" / "finetune" / f"{mode}.yaml"), encoder)
    del encoder
    num_classes = 10
    head = torch.nn.functional.normalize(torch.randn(num_classes, module_output_dim(module, size)), dim=-1)
    classifier = ImageClassifier(module, head)
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)

    flops = None
    if not args.no_flops:  # one fp32 step of batch 1 on the CPU copy: exact op counts, precision-independent
        x, y = torch.randn(1, 3, size, size), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            torch.nn.functional.cross_entropy(classifier(x), y).backward()
        flops = counter.get_total_flops()
        classifier.zero_grad(set_to_none=True)

    steps = args.warmup + args.steps
    data = _random_images(max(4 * args.batch_size, 256), size, num_classes)
    lm = ClassifierFinetune(classifier, num_classes, lr=1e-5, weight_decay=0.1, warmup_steps=10, max_steps=steps,
                            train_set=data, batch_size=args.batch_size, seed=0)

    class Clock(Callback):
        t0 = t1 = None

        def _sync(self):
            if cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                self._sync()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self._sync()
            self.t1 = time.perf_counter()

    clock = Clock()
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=args.devices if cuda else 1,
                        precision=args.precision, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(lm)
    wall = clock.t1 - clock.t0

    # evaluation: the pipeline's own path (fusion_bench.evaluation.accuracy.predictions) on the trainer's device
    # and precision; one untimed batch first
    where = {"device": "cuda" if cuda else "cpu",
             "autocast": torch.bfloat16 if args.precision.startswith("bf16") else None}
    eval_data = _random_images(args.eval_batch_size * (args.eval_batches + 1), size, num_classes)
    predictions(classifier, torch.utils.data.Subset(eval_data, range(args.eval_batch_size)),
                args.eval_batch_size, **where)
    timed = torch.utils.data.Subset(eval_data, range(args.eval_batch_size, len(eval_data)))
    t0 = time.perf_counter()
    predictions(classifier, timed, args.eval_batch_size, **where)
    eval_images_per_s = len(timed) / (time.perf_counter() - t0)
    out = {"arch": arch, "mode": mode, "precision": args.precision, "batch_size": args.batch_size,
           "steps_timed": args.steps, "devices": trainer.world_size, "trainable_params": trainable,
           "s_per_step": wall / args.steps, "images_per_s": args.steps * args.batch_size / wall,
           "eval_images_per_s": eval_images_per_s, "eval_batch_size": args.eval_batch_size,
           "train_gflops_per_image": None if flops is None else flops / 1e9,
           "device": torch.cuda.get_device_name() if cuda else f"cpu x{args.threads} threads",
           "torch": torch.__version__}
    if cuda:
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def module_output_dim(module, size: int) -> int:
    import torch

    with torch.no_grad():
        return module(torch.zeros(1, 3, size, size)).shape[-1]


def run_one(arch: str, mode: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "fusion_bench.benchmarks.finetune", *argv, "--worker", mode],
                          check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{arch} {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], task_steps: int, task_batch: int) -> str:
    mem = "peak GPU mem (GiB)" if "peak_gpu_mem_gib" in rows[0] else "peak RSS (GiB)"
    header = (f"| mode | trainable params | train images/s | s/step (batch {rows[0]['batch_size']}) | {mem} "
              f"| train GFLOPs/image | eval images/s | one task: {task_steps} x {task_batch} images |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r.get("peak_gpu_mem_gib", r["peak_rss_gib"])
        fl = "-" if r["train_gflops_per_image"] is None else f"{r['train_gflops_per_image']:.3g}"
        seconds = task_steps * task_batch / r["images_per_s"]
        took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
        lines.append(f"| {r['mode']} | {r['trainable_params']:,} | {r['images_per_s']:.1f} | {r['s_per_step']:.3f} "
                     f"| {m:.2f} | {fl} | {r['eval_images_per_s']:.1f} | {took} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit_b32")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    ap.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on GPU, 32 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on GPU, 16 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on GPU, 8 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 on GPU, 2 on CPU)")
    ap.add_argument("--eval-batch-size", type=int, default=None, help="default 256 on GPU, 32 on CPU")
    ap.add_argument("--eval-batches", type=int, default=None, help="timed evaluation batches (20 GPU, 3 CPU)")
    ap.add_argument("--devices", type=int, default=1, help="GPUs (DDP when > 1; --batch-size is the global batch)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    args.precision = args.precision or ("bf16-mixed" if gpu else "32")
    args.batch_size = args.batch_size or (128 if gpu else 16)
    args.steps = args.steps or (200 if gpu else 8)
    args.eval_batch_size = args.eval_batch_size or (256 if gpu else 32)
    args.eval_batches = args.eval_batches or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    if args.worker:
        print(json.dumps(worker(ARCHS[args.arch], args.worker, args)))
        return
    argv = sys.argv[1:]
    rows = []
    for mode in args.modes:
        print(f"{args.arch} {mode}: {args.warmup} + {args.steps} steps of {args.batch_size} ({args.precision}) ...",
              file=sys.stderr, flush=True)
        rows.append(run_one(args.arch, mode, argv))
        print(f"  {rows[-1]['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    from omegaconf import OmegaConf

    train = OmegaConf.load(ROOT / "conf" / "model" / f"{args.arch}.yaml").train
    print(f"\n{rows[0]['device']}, torch {rows[0]['torch']}, {args.arch} ({ARCHS[args.arch]}), "
          f"precision {args.precision}, {args.devices if gpu else 1} device(s)\n")
    print(table(rows, train.steps, train.batch_size))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
