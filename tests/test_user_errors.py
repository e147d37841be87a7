"""What each kind of bad input gets (issue 34, README "Bad input"): a config error refused before any work with one
line naming the option, the value and what it must be (exit 1; the traceback with HYDRA_FULL_ERROR=1); a broken
user checkpoint refused before it enters the store, naming the file and its task; a run folder used twice refused at
the start; a sweep with a failed job still summarised; a full disk named with the path; report.json valid JSON."""

import copy
import errno
import json
import math
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from safetensors.torch import save_file

from fusion_bench import entry
from fusion_bench.errors import ConfigError, DiskFullError
from fusion_bench.pipeline import run

ROOT = Path(__file__).resolve().parent.parent
Usage = namedtuple("Usage", "total used free")
CONF = str(ROOT / "conf")


def _no_training(monkeypatch):
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))


def _entry(tmp_path, data_dir, *overrides: str) -> Path:
    """run.py's task function in this process, as Hydra calls it for an ordinary run into tmp_path/run."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", f"paths.data={data_dir}", *overrides],
                      return_hydra_config=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    task_cfg = copy.deepcopy(cfg)
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    HydraConfig.instance().set_config(cfg)
    try:
        entry.main(task_cfg)
    finally:
        HydraConfig.instance().cfg = None
    return run_dir


# each case of the issue: the overrides and the start of the one line it now gets
CASES = {
    "method.scaling_coef=nan": "method.scaling_coef=nan: must be a finite number in [-1000, 1000]",
    "method.scaling_coef=inf": "method.scaling_coef=inf: must be a finite number",
    "method.scaling_coef=1e9": "method.scaling_coef=1000000000.0: must be a finite number in [-1000, 1000]",
    "method.scaling_coef=abc": "method.scaling_coef='abc': must be a finite number",
    "method.scaling_coef=abcdefgh": "method.scaling_coef='abcdefgh': must be a finite number",
    "model.train.steps=0": "model.train.steps=0: must be an integer >= 1",
    "model.train.steps=-1": "model.train.steps=-1: must be an integer >= 1",
    "model.train.steps=-5": "model.train.steps=-5: must be an integer >= 1",
    "model.train.lr=-1": "model.train.lr=-1: must be a finite number > 0",
    "taskpool.tasks=[]": "taskpool.tasks=[]: must be a non-empty list of distinct task names",
    "method=dare method.p=1.0": "method.p=1.0: must be a finite number in [0, 1)",
    "finetuned_from=''": "finetuned_from='': empty; give a path with {task}",  # an unset FINETUNED_FROM (issue 35)
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_option_is_one_line_before_any_work(case, tmp_path, data_dir, monkeypatch, capsys):
    _no_training(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        _entry(tmp_path, data_dir, *case.split())
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"Error: {CASES[case]}"), err
    assert not (tmp_path / "store").exists()  # nothing loaded into, or trained for, the store
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_hydra_full_error_gives_the_traceback(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match=r"model\.train\.steps=0: must be an integer >= 1"):
        _entry(tmp_path, data_dir, "model.train.steps=0")


def test_a_coefficient_beyond_ten_is_warned_before_any_work(make_cfg, caplog):
    from fusion_bench.pipeline import validate_config

    validate_config(make_cfg("method.scaling_coef=20"))
    assert "method.scaling_coef=20: |coefficient| > 10" in caplog.text


# ---- a user's checkpoint (finetuned_from) -------------------------------------------------------------------------
def _encoder_state(make_cfg) -> dict[str, torch.Tensor]:
    from fusion_bench.families import build_family

    return {k: v.detach().clone().contiguous() for k, v in build_family(make_cfg()).encoder.state_dict().items()}


def _broken(kind: str, good: dict[str, torch.Tensor], path: Path) -> Path:
    if kind == "truncated":
        save_file(good, str(path))
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "nan":
        bad = dict(good)
        bad["conv1.weight"] = good["conv1.weight"].clone()
        bad["conv1.weight"].view(-1)[3] = math.nan
        save_file(bad, str(path))
    elif kind == "keys":
        save_file({k: v for k, v in good.items() if k != "conv1.weight"}, str(path))
    elif kind == "shapes":
        save_file({**good, "conv1.weight": torch.zeros(3, 3)}, str(path))
    return path


USER_FILE_ERRORS = {
    "truncated": "is not a readable weights file",
    "text": "is not a readable weights file",
    "nan": r"tensor 'conv1.weight' holds NaN or Inf \(1 of",
    "keys": r"is not a fine-tune of this image encoder: 1 missing keys \['conv1.weight'\]",
    "shapes": "has other shapes than this model",
}


@pytest.mark.parametrize("kind", sorted(USER_FILE_ERRORS))
def test_a_broken_user_checkpoint_is_refused_before_the_store(kind, make_cfg, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    src = _broken(kind, _encoder_state(make_cfg), tmp_path / "ft_digits.safetensors")
    cfg = make_cfg("taskpool.tasks=[digits,shapes]", f"finetuned_from={{digits: {src}}}", "method.scaling_coef=0.3")
    with pytest.raises(ConfigError, match=USER_FILE_ERRORS[kind]) as refused:
        run(cfg, tmp_path / "run", "task_arithmetic")  # shapes would be fine-tuned: the import is checked first
    assert str(refused.value).startswith(f"finetuned_from: {src} (the fine-tune of task 'digits')")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "store").exists()


def test_a_broken_user_checkpoint_is_one_line(make_cfg, tmp_path, data_dir, monkeypatch, capsys):
    _no_training(monkeypatch)
    src = _broken("text", {}, tmp_path / "ft_digits.safetensors")
    with pytest.raises(SystemExit):
        _entry(tmp_path, data_dir, "taskpool.tasks=[digits]", f"finetuned_from={src}", "method.scaling_coef=0.3")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"Error: finetuned_from: {src} (the fine-tune of task 'digits') "
                                                   f"is not a readable weights file"), err


# ---- a full disk --------------------------------------------------------------------------------------------------
def _full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_leaves_nothing_partial(tmp_path, monkeypatch):
    from fusion_bench.export.files import new_dir
    from fusion_bench.store import atomic_save_safetensors, atomic_write

    earlier = atomic_save_safetensors({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    monkeypatch.setattr("fusion_bench.store.save_file", _full)
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {earlier}") as full:
        atomic_save_safetensors({"a": torch.zeros(2)}, earlier)
    assert full.value.errno == errno.ENOSPC and isinstance(full.value, OSError)
    with pytest.raises(DiskFullError, match="no space left on device while writing .*merged_transformers"):
        new_dir(tmp_path / "merged_transformers", _full)

    # torch.save's zip writer on a full disk says only "unexpected pos": the free space tells
    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr("fusion_bench.store.shutil.disk_usage", lambda p: Usage(total=10**9, used=10**9, free=4096))
    with pytest.raises(DiskFullError, match=r"while writing .*last\.ckpt"):
        atomic_write(tmp_path / "checkpoints" / "last.ckpt", torch_full)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["w.safetensors"]


def test_an_error_that_is_no_full_disk_stays_itself(tmp_path):
    from fusion_bench.store import atomic_write

    def broken(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space here
        atomic_write(tmp_path / "x.ckpt", broken)


def test_a_full_disk_while_importing_keeps_the_store_clean(make_cfg, tmp_path, monkeypatch, capsys, data_dir):
    _no_training(monkeypatch)
    src = tmp_path / "ft_digits.safetensors"
    save_file(_encoder_state(make_cfg), str(src))
    monkeypatch.setattr("fusion_bench.store.save_file", _full)
    with pytest.raises(SystemExit):
        _entry(tmp_path, data_dir, "taskpool.tasks=[digits]", f"finetuned_from={src}", "method.scaling_coef=0.3")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"Error: no space left on device while writing {tmp_path}/store/")
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.suffix != ".lock"] == []


# ---- report.json ----------------------------------------------------------------------------------------------------
def test_report_json_is_valid_json_with_null_for_non_finite_values(tmp_path):
    from fusion_bench.reporting.report import write_report

    row = {"zeroshot": 0.1, "finetuned": 0.9, "merged": math.nan, "normalized": math.inf}
    report = {"model": "m", "taskpool": "p", "finetune": "standard", "method": "x", "scaling_coef": -math.inf,
              "tasks": {"a": row}, "average": row}
    text = write_report(report, tmp_path).read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))
    assert strict["tasks"]["a"] == {"zeroshot": 0.1, "finetuned": 0.9, "merged": None, "normalized": None}
    assert strict["scaling_coef"] is None
    from fusion_bench.reporting.summary import summarize

    summarize(tmp_path)  # and the multirun summary reads it
    assert "| None | None |" in (tmp_path / "summary.md").read_text()


# ---- run.py itself (subprocesses: the exit status and what the terminal shows) ---------------------------------------
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})})


def test_run_py_prints_a_user_error_as_one_line_and_exits_1(tmp_path):
    out = _cli(f"paths.root={tmp_path}", "model.train.steps=-5")
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["Error: model.train.steps=-5: must be an integer >= 1 (optimizer steps of "
                                       + "each fine-tune)"]
    assert not (tmp_path / "store").exists()
    full = _cli(f"paths.root={tmp_path}", "model.train.steps=-5", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigError: model.train.steps=-5" in full.stderr


def test_the_same_run_dir_twice_is_refused_at_the_start(make_cfg, tmp_path):
    src = tmp_path / "ft_digits.safetensors"
    save_file(_encoder_state(make_cfg), str(src))
    args = [f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run", "stage=merge", "taskpool.tasks=[digits]",
            f"finetuned_from={src}", "method.scaling_coef=0.3"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    merged = (tmp_path / "run" / "merged.safetensors").read_bytes()
    again = _cli(*args)
    assert again.returncode == 1
    refusal = (f"Error: hydra.run.dir={tmp_path}/run: already holds an earlier run (merged.safetensors); must be a "
               f"new folder: outputs are never overwritten (the default is new for every run)")
    assert again.stderr.splitlines() == [refusal]
    assert (tmp_path / "run" / "merged.safetensors").read_bytes() == merged


def test_a_sweep_with_a_failed_job_summarises_the_others(tmp_path):
    out = _cli("-m", f"paths.root={tmp_path}", "taskpool.tasks=[digits]", "model.train.steps=2",
               "model.train.warmup_steps=1", "model.train.batch_size=8", "method.scaling_coef=0.1,abc,0.3")
    assert out.returncode == 1
    assert "method.scaling_coef='abc': must be a finite number" in out.stderr and "Traceback" not in out.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("model,") and rows[0].endswith(",run,error")
    assert [r.split(",")[4] for r in rows[1:3]] == ["0.1", "0.3"]  # the scaling_coef column of the good jobs
    assert rows[3].startswith(",,,") and "method.scaling_coef='abc'" in rows[3]
    md = (sweep / "summary.md").read_text()
    assert "Failed jobs (1):" in md and "| 1 |" in md and "method.scaling_coef='abc': must be" in md
    assert json.loads((sweep / "1" / "error.json").read_text())["type"] == "ConfigError"


def test_a_read_only_folder_is_no_full_disk(tmp_path, monkeypatch):
    from fusion_bench.store import atomic_write

    def read_only(tmp):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("fusion_bench.store.shutil.disk_usage", lambda p: Usage(total=10**9, used=10**9, free=0))
    with pytest.raises(OSError, match="Read-only") as refused:
        atomic_write(tmp_path / "x.safetensors", read_only)
    assert not isinstance(refused.value, DiskFullError)


def test_the_imported_benchmark_without_finetuned_from_says_to_set_it():
    done = subprocess.run(["make", "-s", "bench-vit-b32-imported", "FINETUNED_FROM="], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "set FINETUNED_FROM, e.g. FINETUNED_FROM=/ckpts/" in done.stderr
