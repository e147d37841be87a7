"""One prepared GPU check: what a 2-core CPU machine cannot measure, in one command and one JSON.

    make gpu-wheels                                   # here, with network: wheels of what the GPU machine lacks
    make gpu-check                                    # there: PYTHONPATH=. python -m fusion_bench.benchmarks.gpu
    python -m fusion_bench.benchmarks.gpu --cpu-smoke # the same code path on the CPU, tiny sizes (tests)

On a lent machine whose tool copies the work tree but not ignored folders, bring `.whl` along (the device tool's
`carry: [".whl"]`) and write the JSON where it is fetched back:
`PYTHONPATH=. python -m fusion_bench.benchmarks.gpu --out $OUT/gpu_check.json` (python3 where there is no python;
the same as `make gpu-check GPU_CHECK_ARGS="--out $OUT/gpu_check.json"` where make exists).

Made for a lent GPU machine that has Python, torch (2.11 or newer), lightning, peft, torchmetrics, transformers,
timm, torchvision, rich and safetensors but no network and none of open_clip_torch, ftfy, hydra-core, omegaconf:
it runs from the source tree (no `pip install -e`); the pure-Python packages it lacks (and regex / PyYAML, cp312
wheels, should they be missing too) are unpacked from the wheels that `make gpu-wheels` put into `.whl/` into a
temporary folder on `sys.path`. A package missing and not among the wheels stops the check with its name.
hydra-core and omegaconf are shipped rather than avoided: the code measured is the project's own (the mode
configs are `conf/finetune/*.yaml` read by OmegaConf, `fusion_bench.errors` derives from Hydra's exception,
`fusion_bench.merging` imports it), so nothing of the project is changed for the check. nevergrad and optuna are
not needed on this path (the test runs it with both hidden).

No weights or data: randomly initialised real-size open_clip ViT-B/32 and ViT-L/14 image encoders
(`ViT-*-quickgelu`) and random images held in memory. The items, in order of value, each with its own time budget:

- `logits/vit_b32`: are the logits fp32 under bf16 autocast (`ImageClassifier` / `head_logits`, the evaluation
  and training forward), for the standard, linear and LoRA modules; how often bf16 changes an argmax against fp32
  (397-class head at CLIP's logit scale), with fp32 logits and with a bf16 head product.
- `finetune/<arch>/<mode>/<precision>`: the project's fine-tuning path (`build_mode_model` on
  `conf/finetune/<mode>.yaml`, `ClassifierFinetune`, its step-indexed loader, AdamW + cosine, Lightning `Trainer`)
  for standard, linear (NTK, `torch.func.jvp`) and LoRA (peft) in bf16-mixed and fp32 at batch 128: images/s
  over a handful of steps after warm-up (`torch.cuda.synchronize` around the timing), the loader alone, and
  evaluation images/s through `fusion_bench.evaluation.accuracy.predictions` and through the bare forward.
- `merge/vit_b32/<method>`: task arithmetic, TIES, TSV-M, Iso-C and WUDI (300 Adam steps) over eight
  ViT-B/32-sized task vectors held in memory. `fusion_bench.merging` runs on the CPU (there is no
  `merge.device` yet), so these are the GPU machine's CPU figures; WUDI has no exact (B A^-1) variant to time.

Every item records its status (ok / failed / timed_out / crashed / skipped), its wall time, its budget, its error
and its peak GPU memory (`torch.cuda.max_memory_allocated`, reset per item). Items run in one worker process that
the driver restarts after an item that hangs past its budget (killed) or kills its process, so one bad item never
stops the rest; the JSON is rewritten atomically before and after every item. The whole check stops starting items
at `--deadline-s` (default 280 s from the start, wheel install included); items left are marked skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusion_bench.reporting import finite_json  # json and math only: safe before the wheels are installed

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "fusion_bench.gpu_check/1"
DEFAULT_WHEEL_DIR = ROOT / ".whl"
DEFAULT_OUT_DIR = ROOT / "outputs" / "gpu_check"
STATUSES = ("pending", "running", "ok", "failed", "timed_out", "crashed", "skipped")

log = logging.getLogger("fusion_bench.gpu_check")


# ---- what the GPU machine may lack ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Shipped:
    """A package `make gpu-wheels` downloads (pinned to the version installed here) for the GPU machine."""

    module: str  # what `import` names
    dist: str  # the distribution on the package index


SHIPPED = (
    Shipped("open_clip", "open_clip_torch"),
    Shipped("ftfy", "ftfy"),
    Shipped("wcwidth", "wcwidth"),
    Shipped("regex", "regex"),  # binary (cp312 manylinux); transformers needs it too, so usually present
    Shipped("omegaconf", "omegaconf"),
    Shipped("hydra", "hydra-core"),
    Shipped("antlr4", "antlr4-python3-runtime"),  # omegaconf's parser; sdist only on the index: built here
    Shipped("yaml", "PyYAML"),  # binary; transformers needs it too, so usually present
)
#: needed and never shipped (binary, large, or tied to the machine's torch): the machine must have them
PREINSTALLED = ("torch", "torchvision", "lightning", "torchmetrics", "peft", "transformers", "safetensors", "timm",
                "rich", "huggingface_hub", "tqdm", "packaging", "numpy")  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _wheel_fits(filename: str, python: tuple[int, int]) -> bool:
    """Whether a wheel's tags (name-ver(-build)-py-abi-plat.whl) install on CPython `python` on Linux x86_64."""
    parts = filename[: -len(".whl")].split("-")
    if len(parts) < 5:
        return False
    py_tags, plat_tags = parts[-3].split("."), parts[-1].split(".")
    py_ok = any(t in ("py3", f"cp{python[0]}{python[1]}", f"py{python[0]}{python[1]}") for t in py_tags)
    plat_ok = any(t == "any" or (t.endswith("x86_64") and "linux" in t) for t in plat_tags)
    return py_ok and plat_ok


def find_wheel(wheel_dir: Path, dist: str, python: tuple[int, int]) -> Path | None:
    name = _normalise(dist)
    for path in sorted(wheel_dir.glob("*.whl")):
        if _normalise(path.name.split("-")[0]) == name and _wheel_fits(path.name, python):
            return path
    return None


def unpack_wheel(wheel: Path, target: Path) -> None:
    """What `pip install --no-deps --target` does with a wheel's importable files: unzip it, with the contents of
    `<name>.data/purelib` and `.../platlib` at the top (scripts, headers and data files are not needed)."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            first, _, rest = name.partition("/")
            if first.endswith(".data"):
                kind, _, rest = rest.partition("/")
                if kind not in ("purelib", "platlib") or not rest:
                    continue
                name = rest
            if name.endswith("/"):
                continue
            dest = target / name
            if target.resolve() not in dest.resolve().parents:
                raise ValueError(f"{wheel.name}: member {info.filename!r} would unpack outside {target}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


class MissingPackages(RuntimeError):
    """Packages the check needs that are neither installed nor among the wheels: stop, naming them."""


def provide_packages(wheel_dir: Path, target: Path) -> list[dict]:
    """Make every SHIPPED module importable: those missing are unpacked from `wheel_dir` into `target` (the
    driver's temporary folder), which goes first on sys.path (and so into the worker, which gets the driver's
    sys.path). Returns what was installed; raises MissingPackages naming everything that cannot be had."""
    python = sys.version_info[:2]
    missing_pre = [m for m in PREINSTALLED if not importable(m)]
    need = [s for s in SHIPPED if not importable(s.module)]
    no_wheel = [s for s in need if find_wheel(wheel_dir, s.dist, python) is None]
    if missing_pre or no_wheel:
        lines = []
        if missing_pre:
            lines.append(f"not installed and never shipped as wheels (install them on this machine): "
                         f"{', '.join(missing_pre)}")
        if no_wheel:
            lines.append(f"not installed and no wheel for Python {python[0]}.{python[1]} in {wheel_dir}: "
                         + ", ".join(f"{s.module} ({s.dist})" for s in no_wheel)
                         + " -- run `make gpu-wheels` on a machine with network access and bring .whl/ along")
        raise MissingPackages("; ".join(lines))
    if not need:
        return []
    installed = []
    for s in need:
        wheel = find_wheel(wheel_dir, s.dist, python)
        assert wheel is not None
        unpack_wheel(wheel, target)
        installed.append({"module": s.module, "dist": s.dist, "wheel": wheel.name})
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    still = [s.module for s in need if not importable(s.module)]
    if still:
        raise MissingPackages(f"unpacked wheels into {target} but still cannot import: {', '.join(still)}")
    log.info("installed from %s into %s: %s", wheel_dir, target, ", ".join(i["wheel"] for i in installed))
    return installed


def download_wheels(wheel_dir: Path, python_version: str) -> int:
    """`make gpu-wheels`: each SHIPPED distribution at the version installed here, as a wheel for CPython
    `python_version` on manylinux x86_64; a distribution the index has only as an sdist (antlr4-python3-runtime
    4.9.3) is built into a wheel here, which must come out pure Python (py3-none-any)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    py = tuple(int(x) for x in python_version.split("."))
    manifest, failed = {}, []
    for s in SHIPPED:
        try:
            version = importlib.metadata.version(s.dist)
        except importlib.metadata.PackageNotFoundError:
            failed.append(f"{s.dist}: not installed here, so no version to pin (run `make setup` first)")
            continue
        spec = f"{s.dist}=={version}"
        for old in wheel_dir.glob("*.whl"):  # other versions of it (an earlier `make gpu-wheels`) would be found too
            name, old_version = old.name.split("-")[:2]
            if _normalise(name) == _normalise(s.dist) and old_version != version:
                old.unlink()
        have = find_wheel(wheel_dir, s.dist, py)
        if have is None or f"-{version}-" not in have.name:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp",
                   *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(wheel_dir), spec]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:  # only an sdist on the index: build the wheel here (pure Python only)
                log.info("%s: no wheel on the index (%s); building one", spec, proc.stderr.strip().splitlines()[-1:])
                proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), spec],
                                      capture_output=True, text=True, check=False)
            have = find_wheel(wheel_dir, s.dist, py)
            if proc.returncode != 0 or have is None:
                failed.append(f"{spec}: {(proc.stderr or proc.stdout).strip()[-500:]}")
                continue
        manifest[s.dist] = {"module": s.module, "version": version, "wheel": have.name}
        log.info("%-24s %s", spec, have.name)
    (wheel_dir / "manifest.json").write_text(json.dumps({"python": python_version, "wheels": manifest}, indent=1))
    if failed:
        for f in failed:
            log.error("could not get %s", f)
        return 1
    log.info("%d wheels in %s; carry this folder to the GPU machine with the source tree", len(manifest), wheel_dir)
    return 0


# ---- the plan -------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of one check. `gpu()` is the real check, `cpu_smoke()` the same code path at tiny sizes."""

    device: str
    archs: dict[str, str]  # slot (vit_b32, vit_l14) -> open_clip architecture actually built
    precisions: tuple[str, ...] = ("bf16-mixed", "32")
    batch_size: int = 128
    warmup_steps: int = 3
    timed_steps: int = 10
    eval_batch_size: int = 256
    eval_batches: int = 8
    loader_workers: int = 4
    num_classes: int = 100
    logits_images: int = 512
    logits_classes: int = 397
    merge_tasks: int = 8
    merge_sigma: float = 3e-4
    wudi_iterations: int = 300
    worker_start_s: float = 120.0
    budget_scale: float = 1.0

    @classmethod
    def gpu(cls) -> Settings:
        return cls(device="cuda", archs={"vit_b32": "ViT-B-32-quickgelu", "vit_l14": "ViT-L-14-quickgelu"})

    @classmethod
    def cpu_smoke(cls) -> Settings:
        return cls(device="cpu", archs={"vit_b32": "tiny-clip", "vit_l14": "tiny-clip"}, batch_size=4,
                   warmup_steps=1, timed_steps=1, eval_batch_size=4, eval_batches=1, loader_workers=1,
                   logits_images=8, wudi_iterations=20, worker_start_s=300.0, budget_scale=2.0)


@dataclass
class Item:
    name: str
    kind: str  # logits | finetune | merge | selftest
    params: dict[str, Any]
    budget_s: float
    status: str = "pending"
    wall_s: float | None = None
    error: str | None = None
    peak_gpu_mem_gib: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


MODES = ("standard", "linear", "lora")
#: (function in fusion_bench.merging, keyword arguments, budget s): the issue's methods at their defaults
MERGES: dict[str, tuple[str, dict[str, Any], float]] = {
    "task_arithmetic": ("task_arithmetic", {"scaling_coef": 0.3}, 45),
    "ties": ("ties_merging", {"k": 0.2, "scaling_coef": 0.3}, 60),
    "iso_c": ("iso_c", {"scaling_coef": 1.0}, 60),
    "tsv_merging": ("tsv_merging", {"scaling_coef": 1.0}, 90),
    "wudi": ("wudi_merging", {"scaling_coef": 1.0, "lr": 1e-5}, 120),
}
#: finetune budgets (s) by (slot, precision); the linear mode gets 1.5x
FINETUNE_BUDGET = {("vit_b32", "bf16-mixed"): 60, ("vit_b32", "32"): 90,
                   ("vit_l14", "bf16-mixed"): 90, ("vit_l14", "32"): 120}  # fmt: skip
INJECTIONS = ("fail", "hang", "crash")


def plan(s: Settings, inject: tuple[str, ...] = ()) -> list[Item]:
    """The items in the order they run: the most wanted first, so that a deadline cuts the least wanted."""
    items: list[Item] = []
    for what in inject:  # self-tests of the driver: they run first, in workers that have imported nothing heavy
        items.append(Item(f"selftest/{what}", "selftest", {"what": what}, 2.0 if what == "hang" else 30.0))

    def finetune(slot: str, precision: str, modes: tuple[str, ...]) -> None:
        for mode in modes:
            budget = FINETUNE_BUDGET[(slot, precision)] * (1.5 if mode == "linear" else 1.0)
            items.append(Item(f"finetune/{slot}/{mode}/{precision}", "finetune",
                              {"slot": slot, "mode": mode, "precision": precision}, budget * s.budget_scale))

    items.append(Item("logits/vit_b32", "logits", {"slot": "vit_b32"}, 60 * s.budget_scale))
    for precision in s.precisions:
        finetune("vit_b32", precision, MODES)
    if "bf16-mixed" in s.precisions:
        finetune("vit_l14", "bf16-mixed", ("standard", "lora", "linear"))
    for method, (_, _, budget) in MERGES.items():
        items.append(Item(f"merge/vit_b32/{method}", "merge", {"slot": "vit_b32", "method": method},
                          budget * s.budget_scale))
    if "32" in s.precisions:  # last: the most likely to be cut by the deadline or to run out of memory
        finetune("vit_l14", "32", ("standard", "lora", "linear"))
    return items


# ---- the worker: runs items, one at a time ----------------------------------------------------------------------
def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _versions() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "torch_threads": torch.get_num_threads(),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for dist in ("lightning", "torchmetrics", "peft", "open_clip_torch", "timm", "torchvision", "transformers",
                 "safetensors", "omegaconf", "hydra-core"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    for module in ("open_clip", "omegaconf", "hydra"):  # where they came from: installed, or the shipped wheels
        spec = importlib.util.find_spec(module)
        out[f"{module}_from"] = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=_gib(props.total_memory), gpu_count=torch.cuda.device_count())
    return out


def _preload(s: Settings) -> dict[str, Any]:
    """Import what the items use (so item budgets do not pay for imports) and describe the machine."""
    t0 = time.perf_counter()
    import lightning  # noqa: F401
    import torch

    import fusion_bench.clip.model
    import fusion_bench.clip.train
    import fusion_bench.evaluation.accuracy
    import fusion_bench.merging
    import fusion_bench.models.modes  # noqa: F401

    _quiet_lightning()
    if s.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device; run with --cpu-smoke to test the code "
                           "path on the CPU")
    if s.device == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context
    loaded = sorted(m for m in sys.modules if m == "fusion_bench" or m.startswith("fusion_bench."))
    return {"import_s": round(time.perf_counter() - t0, 2), **_versions(), "fusion_bench_modules": loaded}


def _quiet_lightning() -> None:
    """Lightning's per-fit notes (GPU available, litlogger tip, max_steps reached) at WARNING: its loggers get
    their levels when lightning is imported, so this runs after the import."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _Clock:
    """Lightning callback: wall time from the start of step `warmup` to the end of training, synchronised."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device = warmup, device
        self.t0: float | None = None
        self.t1: float | None = None

    def make(self):
        from lightning.pytorch.callbacks import Callback

        clock = self

        class Clock(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == clock.warmup and clock.t0 is None:
                    _sync(clock.device)
                    clock.t0 = time.perf_counter()

            def on_train_end(self, trainer, pl_module):
                _sync(clock.device)
                clock.t1 = time.perf_counter()

        return Clock()


def _encoder(slot: str, s: Settings, state: dict):
    """The randomly initialised image encoder of a slot, built once per worker (modes copy it)."""
    cache = state.setdefault("encoders", {})
    if slot not in cache:
        import torch

        from fusion_bench.clip.model import _QuietRandomInit, create_clip

        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]), _QuietRandomInit():
            torch.default_generator.manual_seed(0)  # the CPU's only: the encoder is built on the CPU
            cache[slot] = (create_clip(s.archs[slot]).visual.eval(), time.perf_counter() - t0)
    return cache[slot]


def _image_size(encoder) -> int:
    size = encoder.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def _mode_cfg(mode: str):
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "conf" / "finetune" / f"{mode}.yaml")


def _head(classes: int, dim: int, seed: int):
    """A zero-shot-like head: unit rows at CLIP's logit scale (100)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return 100 * torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)


def run_logits(params: dict, s: Settings, state: dict) -> dict:
    """Logits' dtype under bf16 autocast through ImageClassifier for three modes, and argmax agreement with fp32."""
    import torch

    encoder, _ = _encoder(params["slot"], s, state)
    size, dim = _image_size(encoder), encoder.output_dim
    head = _head(s.logits_classes, dim, 1).to(s.device)
    g = torch.Generator().manual_seed(2)
    batch = min(s.logits_images, 128)
    out: dict[str, Any] = {"arch": s.archs[params["slot"]], "device": s.device, "autocast": "bfloat16",
                           "classes": s.logits_classes, "images": s.logits_images, "modes": {}}
    xs = [torch.randn(min(batch, s.logits_images - i), 3, size, size, generator=g)
          for i in range(0, s.logits_images, batch)]
    failed = []
    for mode in MODES:  # a mode that fails (e.g. peft too old for LoRA on attention) is recorded, the rest run
        try:
            out["modes"][mode] = _logits_of_mode(mode, encoder, head, xs, s.device)
        except Exception as e:  # noqa: BLE001
            out["modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            failed.append(mode)
    if len(failed) == len(MODES):
        raise RuntimeError(f"every mode failed; standard: {out['modes']['standard']['error']}")
    out["modes_failed"] = failed
    out["logits_fp32"] = all(m["logits_fp32"] for m in out["modes"].values() if "error" not in m)
    return out


def _logits_of_mode(mode: str, encoder, head, xs: list, device: str) -> dict:
    import torch

    from fusion_bench.clip.model import ImageClassifier
    from fusion_bench.evaluation.accuracy import eval_mode
    from fusion_bench.models.modes import build_mode_model

    module = build_mode_model(_mode_cfg(mode), encoder).to(device)
    clf = ImageClassifier(module, head).to(device)
    ref, bf16_logits, bf16_head = [], [], []
    dtypes: dict[str, str] = {}
    with torch.no_grad(), eval_mode(clf):
        for x in xs:
            x = x.to(device)
            ref.append(clf(x).argmax(-1).cpu())
            with torch.autocast(device, dtype=torch.bfloat16):
                feats = module(x)
                logits = clf(x)
                naive = (feats / feats.norm(dim=-1, keepdim=True)) @ head.T  # what a plain product gives
            dtypes = {"features": str(feats.dtype), "logits": str(logits.dtype), "plain_head_product":
                      str(naive.dtype)}
            bf16_logits.append(logits.argmax(-1).cpu())
            bf16_head.append(naive.argmax(-1).cpu())
    r = torch.cat(ref)
    return {
        "dtypes": dtypes, "logits_fp32": dtypes["logits"] == "torch.float32",
        "argmax_agreement_fp32_logits": float((torch.cat(bf16_logits) == r).float().mean()),
        "argmax_agreement_bf16_head_product": float((torch.cat(bf16_head) == r).float().mean()),
    }


def run_finetune(params: dict, s: Settings, state: dict) -> dict:
    """One short fine-tune through the project's LightningModule, loader and Trainer, then evaluation."""
    import lightning as L
    import torch
    from torch.utils.data import Subset, TensorDataset

    from fusion_bench.clip.model import ImageClassifier
    from fusion_bench.clip.train import ClassifierFinetune
    from fusion_bench.evaluation.accuracy import eval_mode, predictions
    from fusion_bench.finetune.sampler import SeededAugmentation, StepBatchSampler, StepDataLoader
    from fusion_bench.models.modes import build_mode_model

    slot, mode, precision = params["slot"], params["mode"], params["precision"]
    cuda = s.device == "cuda"
    encoder, build_s = _encoder(slot, s, state)
    size, dim = _image_size(encoder), encoder.output_dim
    t0 = time.perf_counter()
    module = build_mode_model(_mode_cfg(mode), encoder)
    classifier = ImageClassifier(module, _head(s.num_classes, dim, 1))
    mode_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(3)
    n = s.batch_size
    train_set = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(s.num_classes, (n,),
                                                                                         generator=g))
    steps = s.warmup_steps + s.timed_steps

    # the loader alone (what the fine-tune's loader can feed): the same sampler, augmentation wrapper, workers
    sampler = StepBatchSampler(n, s.batch_size, 0, steps, with_seeds=True)
    loader = StepDataLoader(SeededAugmentation(train_set), sampler, step=lambda: 0, num_workers=s.loader_workers,
                            pin_memory=cuda)
    it = iter(loader)
    next(it)  # worker start-up
    _sync(s.device)
    tl = time.perf_counter()
    for _ in range(steps - 1):
        x, _y = next(it)
        x.to(s.device, non_blocking=True)
    _sync(s.device)
    loader_rate = (steps - 1) * s.batch_size / (time.perf_counter() - tl)
    del it, loader

    lm = ClassifierFinetune(classifier, s.num_classes, lr=1e-5, weight_decay=0.1, warmup_steps=2, max_steps=steps,
                            train_set=train_set, batch_size=s.batch_size, seed=0, num_workers=s.loader_workers)
    clock = _Clock(s.warmup_steps, s.device)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock.make()], use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(lm)
    if clock.t0 is None or clock.t1 is None:
        raise RuntimeError(f"the fit ended after {trainer.global_step} of {steps} steps: nothing was timed")
    train_s = clock.t1 - clock.t0
    train_peak = torch.cuda.max_memory_allocated() if cuda else None

    # evaluation: the pipeline's predictions() (host batches, moves the model there and back) ...
    autocast = torch.bfloat16 if precision.startswith("bf16") else None
    eval_base = TensorDataset(torch.randn(s.eval_batch_size, 3, size, size, generator=g),
                              torch.zeros(s.eval_batch_size, dtype=torch.long))
    n_eval = s.eval_batch_size * s.eval_batches
    timed = Subset(eval_base, [i % s.eval_batch_size for i in range(n_eval)])
    where = {"device": s.device, "autocast": autocast, "num_workers": s.loader_workers}
    predictions(classifier, Subset(eval_base, range(s.eval_batch_size)), s.eval_batch_size, **where)  # warm-up
    te = time.perf_counter()
    predictions(classifier, timed, s.eval_batch_size, **where)
    eval_rate = n_eval / (time.perf_counter() - te)
    # ... and the bare forward on a batch already on the device (the model's own rate)
    classifier.to(s.device)
    x = eval_base.tensors[0].to(s.device)
    cast = torch.autocast(s.device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad(), eval_mode(classifier), cast:
        logits = classifier(x)
        _sync(s.device)
        tm = time.perf_counter()
        for _ in range(s.eval_batches):
            classifier(x)
        _sync(s.device)
        model_rate = n_eval / (time.perf_counter() - tm)
    classifier.cpu()
    return {
        "arch": s.archs[slot], "mode": mode, "precision": precision, "device": s.device,
        "batch_size": s.batch_size, "warmup_steps": s.warmup_steps, "timed_steps": s.timed_steps,
        "trainable_params": trainable, "encoder_build_s": round(build_s, 2), "mode_build_s": round(mode_s, 2),
        "train_s_per_step": train_s / s.timed_steps, "train_images_per_s": s.timed_steps * s.batch_size / train_s,
        "train_peak_gpu_mem_gib": None if train_peak is None else _gib(train_peak),
        "loader_images_per_s": loader_rate, "loader_workers": s.loader_workers,
        "eval_batch_size": s.eval_batch_size, "eval_images": n_eval,
        "eval_images_per_s": eval_rate, "eval_model_images_per_s": model_rate,
        "eval_logits_dtype": str(logits.dtype),
    }


def _merge_inputs(slot: str, s: Settings, state: dict) -> tuple[dict, list[dict], float]:
    """theta_0 (the random encoder's weights, fp32) and `merge_tasks` copies theta_0 + sigma (0.5 c + z_t): a
    shared component makes the task vectors correlated (pairwise cosine ~0.2), as real ones are (the same recipe
    as fusion_bench/benchmarks/merge.py, generated on the check's device and held in host memory)."""
    cached = state.get("merge_inputs")
    if cached is not None and cached[0] == slot:
        return cached[1], cached[2], 0.0
    import torch

    state.pop("merge_inputs", None)
    encoder, _ = _encoder(slot, s, state)
    t0 = time.perf_counter()
    pre = {k: v.detach().float().clone().contiguous() for k, v in encoder.state_dict().items()}
    fts = []
    for t in range(s.merge_tasks):
        shared = torch.Generator(device=s.device).manual_seed(12345)  # the same shared component for every task
        own = torch.Generator(device=s.device).manual_seed(1000 + t)
        ft = {}
        for k, v in pre.items():
            if not v.is_floating_point():
                ft[k] = v
                continue
            noise = torch.randn(v.shape, generator=shared, device=s.device).mul_(0.5)
            noise.add_(torch.randn(v.shape, generator=own, device=s.device)).mul_(s.merge_sigma)
            ft[k] = v + noise.cpu()
        fts.append(ft)
    state["merge_inputs"] = (slot, pre, fts)
    return pre, fts, time.perf_counter() - t0


def run_merge(params: dict, s: Settings, state: dict) -> dict:
    import torch

    import fusion_bench.merging as fm

    method = params["method"]
    fn_name, kwargs, _ = MERGES[method]
    if method == "wudi":
        kwargs = {**kwargs, "iterations": s.wudi_iterations}
    pre, fts, built_s = _merge_inputs(params["slot"], s, state)
    notes: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    merging_log = logging.getLogger("fusion_bench.merging")
    grab, level = Grab(level=logging.INFO), merging_log.level
    merging_log.addHandler(grab)
    merging_log.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        merged = getattr(fm, fn_name)(pre, fts, **kwargs)
        wall = time.perf_counter() - t0
    finally:
        merging_log.removeHandler(grab)
        merging_log.setLevel(level)
    finite = all(bool(torch.isfinite(v).all()) for v in merged.values() if v.is_floating_point())
    n_params = sum(v.numel() for v in pre.values())
    del merged
    return {"arch": s.archs[params["slot"]], "function": f"fusion_bench.merging.{fn_name}", "kwargs": kwargs,
            "n_tasks": len(fts), "n_params": n_params, "merge_s": wall, "merge_device": "cpu",
            "torch_threads": torch.get_num_threads(), "inputs_built_s": round(built_s, 2),
            "inputs": "in-memory fp32 state dicts (not LazyStateDict files)", "merged_finite": finite,
            "notes": notes}


def run_selftest(params: dict, s: Settings, state: dict) -> dict:
    what = params["what"]
    if what == "fail":
        raise RuntimeError("injected failure (--inject fail)")
    if what == "hang":
        time.sleep(3600)
    if what == "crash":
        os._exit(3)
    raise ValueError(f"unknown self-test {what!r}")


RUNNERS = {"logits": run_logits, "finetune": run_finetune, "merge": run_merge, "selftest": run_selftest}


def _clean(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _worker_main(conn, driver_end, settings: dict) -> None:
    """The worker process: ("preload",) and ("item", kind, params) messages, one answer each. It closes its
    forked copy of the driver's end of the pipe, so that it sees the pipe close (EOF) when the driver dies."""
    driver_end.close()
    logging.basicConfig(level=logging.WARNING, format="  [worker] %(message)s", stream=sys.stderr, force=True)
    import warnings

    for noise in (r".*torch\.jit\.script.* is deprecated", r".*isinstance\(treespec, LeafSpec\)"):
        warnings.filterwarnings("ignore", message=noise)
    s = Settings(**{**settings, "precisions": tuple(settings["precisions"])})
    state: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        try:
            if msg[0] == "preload":
                conn.send(("ok", _preload(s), None))
                continue
            _, kind, params = msg
            peak = None
            if kind != "selftest":
                _clean(s.device)
            result = RUNNERS[kind](params, s, state)
            if kind != "selftest" and s.device == "cuda":
                import torch

                peak = _gib(torch.cuda.max_memory_allocated())
                _clean(s.device)
            conn.send(("ok", result, peak))
        except BaseException as e:  # noqa: BLE001  (an item's failure is its result)
            text = f"{type(e).__name__}: {e}".strip()
            peak = None
            with contextlib.suppress(Exception):
                if s.device == "cuda" and msg[0] == "item":
                    import torch

                    peak = _gib(torch.cuda.max_memory_allocated())  # how far it got (e.g. before running out)
            conn.send(("error", {"error": text[:2000], "traceback": traceback.format_exc()[-6000:]}, peak))
            with contextlib.suppress(Exception):
                _clean(s.device)


# ---- the driver ---------------------------------------------------------------------------------------------------
class Worker:
    """One worker process and its pipe. `ask` waits at most `budget` seconds for the answer: None when the
    worker hung (it is killed) or died (its exit code is kept)."""

    def __init__(self, settings: Settings):
        # fork: the driver has imported nothing heavy, so the worker starts at once, with the driver's sys.path
        # (the unpacked wheels), and its DataLoader workers are forked as in a plain run (a spawned worker would
        # spawn them too: ~2 s of imports each)
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        # not a daemon: a daemonic process may not start the DataLoader's worker processes. It still ends with the
        # driver: its recv() sees the pipe close
        self.proc = ctx.Process(target=_worker_main, args=(child, self.conn, asdict(settings)), daemon=False)
        self.proc.start()
        child.close()
        self.preloaded = False
        self.outcome = ""  # why the last ask gave None: timed_out | crashed

    def ask(self, msg: tuple, budget: float):
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            self.proc.join(5)
            self.outcome = "crashed"
            return None
        if not self.conn.poll(max(budget, 0.01)):
            self.outcome = "timed_out"
            self.kill()
            return None
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            self.outcome = "crashed"
            return None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        self.proc.join(10)
        self.kill()


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(finite_json.finite(obj), f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Check:
    """Runs the plan item by item and keeps the JSON up to date."""

    def __init__(self, settings: Settings, items: list[Item], out: Path, deadline_s: float, argv: list[str],
                 mode: str, started: float):
        self.s, self.items, self.out = settings, items, out
        self.deadline = started + deadline_s
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "mode": mode, "command": argv, "complete": False,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "finished": None,
            "deadline_s": deadline_s, "wall_s": None,
            "host": {"hostname": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                     "python": platform.python_version()},
            "environment": None, "wheels_installed": [], "settings": asdict(settings),
            "notes": [
                ("merge items run fusion_bench.merging on the CPU: there is no merge.device yet; once it exists "
                 "these items are to time merge.device=cuda against cpu, and ViT-L/14-sized task vectors on cuda"),
                "WUDI has no exact variant (B A^-1) in fusion_bench.merging.wudi; only its Adam form is timed",
                "random weights and random images: speeds and memory, not accuracies",
            ],
            "summary": None, "items": [],
        }
        self.started = started
        self.worker: Worker | None = None
        self.failed_starts = 0

    def save(self) -> None:
        self.doc["items"] = [asdict(i) for i in self.items]
        counts = {st: sum(i.status == st for i in self.items if i.kind != "selftest") for st in STATUSES}
        logits = next((i for i in self.items if i.kind == "logits" and i.status == "ok"), None)
        self.doc["summary"] = {**{k: v for k, v in counts.items() if v},
                               "logits_fp32_under_bf16": logits.result.get("logits_fp32") if logits else None,
                               "logits_modes_failed": logits.result.get("modes_failed") if logits else None}
        self.doc["wall_s"] = round(time.perf_counter() - self.started, 1)
        write_json_atomic(self.out, self.doc)

    def _worker_for(self, item: Item) -> Worker | str:
        """A worker ready for `item` (preloaded unless a self-test), or the reason none could be had."""
        if self.worker is None:
            self.worker = Worker(self.s)
        if item.kind == "selftest" or self.worker.preloaded:
            return self.worker
        budget = min(self.s.worker_start_s, self.deadline - time.perf_counter())
        answer = self.worker.ask(("preload",), budget)
        if answer is None or answer[0] != "ok":
            why = (f"worker start-up {self.worker.outcome} after {budget:.0f} s" if answer is None
                   else f"worker start-up failed: {answer[1]['error']}")
            if answer is not None:
                log.error("%s\n%s", why, answer[1]["traceback"])
            self.worker.kill()
            self.worker = None
            self.failed_starts += 1
            return why
        self.worker.preloaded = True
        self.failed_starts = 0
        if self.doc["environment"] is None:
            self.doc["environment"] = answer[1]
            env = answer[1]
            log.info("worker ready in %.1f s: torch %s, %s", env["import_s"], env["torch"],
                     env.get("gpu") or f"CPU, {env['torch_threads']} threads")
        return self.worker

    def run_item(self, k: int, item: Item) -> None:
        left = self.deadline - time.perf_counter()
        if left < 1:
            item.status, item.error = "skipped", f"the check's deadline ({self.doc['deadline_s']:.0f} s) was reached"
            return
        if self.failed_starts >= 2:
            item.status, item.error = "skipped", "the worker failed to start twice; see the earlier items' errors"
            return
        item.status = "running"
        self.save()
        t0 = time.perf_counter()
        worker = self._worker_for(item)
        if isinstance(worker, str):
            item.status, item.error, item.wall_s = "failed", worker, round(time.perf_counter() - t0, 2)
            return
        budget = min(item.budget_s, self.deadline - time.perf_counter())
        t0 = time.perf_counter()
        answer = worker.ask(("item", item.kind, item.params), budget)
        item.wall_s = round(time.perf_counter() - t0, 2)
        if answer is None:
            item.status = worker.outcome
            item.error = (f"did not finish within its budget of {budget:.0f} s (killed)" if worker.outcome ==
                          "timed_out" else f"the worker process died (exit code {worker.proc.exitcode})")
            self.worker = None
            return
        status, payload, peak = answer
        item.peak_gpu_mem_gib = peak  # on failure: the peak reached before it
        if status == "ok":
            item.status, item.result = "ok", payload
        else:
            item.status, item.error = "failed", payload["error"]
            item.result = {"traceback": payload["traceback"]}

    def run(self) -> None:
        self.save()
        n = len(self.items)
        try:
            for k, item in enumerate(self.items, 1):
                self.run_item(k, item)
                log.info("[%d/%d] %-36s %-9s %6s s  %s", k, n, item.name, item.status,
                         "-" if item.wall_s is None else f"{item.wall_s:.1f}", _headline(item))
                self.save()
            self.doc["complete"] = True
        except BaseException as e:
            self.doc["aborted"] = f"{type(e).__name__}: {e}"  # Ctrl-C, SIGTERM; complete stays false
            if self.worker is not None:
                self.worker.kill()  # now, not after its item
                self.worker = None
            raise
        finally:
            if self.worker is not None:
                self.worker.stop()
            self.doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.save()


def _headline(item: Item) -> str:
    r = item.result
    if item.status != "ok":
        return (item.error or "").splitlines()[0][:160] if item.error else ""
    if item.kind == "finetune":
        mem = f", peak {item.peak_gpu_mem_gib:.1f} GiB" if item.peak_gpu_mem_gib is not None else ""
        return (f"train {r['train_images_per_s']:.0f} img/s (loader {r['loader_images_per_s']:.0f}), "
                f"eval {r['eval_images_per_s']:.0f} / bare {r['eval_model_images_per_s']:.0f} img/s{mem}")
    if item.kind == "merge":
        return f"{r['merge_s']:.2f} s on the CPU ({r['torch_threads']} threads)"
    if item.kind == "logits":
        agree = ", ".join(f"{m} {v['argmax_agreement_fp32_logits']:.3f}" if "error" not in v else f"{m} FAILED"
                          for m, v in r["modes"].items())
        return f"logits fp32: {r['logits_fp32']}; argmax agreement bf16 vs fp32: {agree}"
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code path on the CPU with tiny sizes")
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON (default outputs/gpu_check/<gpu_check|cpu_smoke>-<time>.json)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no item after this many seconds from the start (default 280; 600 with --cpu-smoke)")
    ap.add_argument("--only", action="append", default=[], help="run only items matching this glob (repeatable)")
    ap.add_argument("--skip", action="append", default=[], help="skip items matching this glob (repeatable)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--timed-steps", type=int, default=None)
    ap.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default 4; 0 smoke)")
    ap.add_argument("--inject", default="", help=f"self-test the driver: comma-separated items of {INJECTIONS} "
                    "run first (fail: raises; hang: outlives its 2 s budget; crash: kills its worker)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--wheel-dir", type=Path, default=DEFAULT_WHEEL_DIR)
    ap.add_argument("--download-wheels", action="store_true", help="`make gpu-wheels`: download into --wheel-dir")
    ap.add_argument("--wheels-python", default="3.12", help="Python version the wheels are for (default 3.12)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.download_wheels:
        return download_wheels(args.wheel_dir, args.wheels_python)

    started = time.perf_counter()
    # SIGTERM (e.g. `timeout`) as an exception: the worker is killed and the JSON says the check was aborted
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # before the worker starts torch's OpenMP: with the default ACTIVE policy, threads on a machine shared with
    # other jobs spin-wait and run many times slower (fusion_bench/benchmarks/merge.py, tests/conftest.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    s = Settings.cpu_smoke() if args.cpu_smoke else Settings.gpu()
    for key in ("batch_size", "warmup_steps", "timed_steps", "loader_workers"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    inject = tuple(x for x in args.inject.split(",") if x)
    if bad := [x for x in inject if x not in INJECTIONS]:
        ap.error(f"--inject: unknown {bad}; expected some of {INJECTIONS}")
    items = [i for i in plan(s, inject)
             if (not args.only or any(fnmatch.fnmatch(i.name, p) for p in args.only))
             and not any(fnmatch.fnmatch(i.name, p) for p in args.skip)]
    if args.list:
        for i in items:
            print(f"{i.name:40s} budget {i.budget_s:5.0f} s")
        return 0
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or DEFAULT_OUT_DIR / f"{mode.replace('-', '_')}-{stamp}.json"
    deadline = args.deadline_s if args.deadline_s is not None else (600.0 if args.cpu_smoke else 280.0)
    check = Check(s, items, out, deadline, [sys.executable, "-m", "fusion_bench.benchmarks.gpu", *argv], mode,
                  started)
    with tempfile.TemporaryDirectory(prefix="fusion_bench_gpu_wheels_") as target:
        try:
            check.doc["wheels_installed"] = provide_packages(args.wheel_dir, Path(target))
        except MissingPackages as e:
            check.doc["error"] = str(e)
            check.doc["complete"] = True
            check.save()
            log.error("gpu check cannot run: %s (%s)", e, out)
            return 2
        log.info("%s check: %d items, deadline %.0f s, JSON %s", mode, len(items), deadline, out)
        check.run()
    bad_items = [i for i in items if i.kind != "selftest" and i.status != "ok"]
    log.info("done in %.0f s: %d of %d items ok; %s", time.perf_counter() - started,
             sum(i.status == "ok" for i in items if i.kind != "selftest"),
             sum(i.kind != "selftest" for i in items), out)
    return 1 if bad_items else 0


if __name__ == "__main__":
    sys.exit(main())
