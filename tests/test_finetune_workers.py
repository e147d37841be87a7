"""Fine-tunes in worker processes (finetune.workers): the same bytes as one after another, failures named."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fusion_bench import keys
from fusion_bench.clip.family import CLIPFamily
from fusion_bench.errors import ConfigError
from fusion_bench.families import build_family
from fusion_bench.pipeline import run
from fusion_bench.stages import finetune_workers
from fusion_bench.store import load_safetensors

CONF = str(Path(__file__).resolve().parent.parent / "conf")
FAST = ["taskpool.tasks=[digits,shapes,colors]", "model.train.steps=8", "model.train.warmup_steps=2",
        "model.train.batch_size=16", "model.train.checkpoint_every=3", "stage=finetune"]


def _cfg(root, data_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"paths.root={root}", f"paths.data={data_dir}", *FAST, *overrides])


def _stored(cfg) -> dict[str, dict[str, torch.Tensor]]:
    fam = build_family(cfg, validate=False)
    return {t: load_safetensors(fam.checkpoint(t)) for t in cfg.taskpool.tasks}


def test_workers_write_the_bytes_of_the_sequential_run(tmp_path, data_dir):
    """Two workers on three tasks (one worker trains two) against one after another in this process with two
    threads set for the run: every stored tensor is the same bytes, under the same store key."""
    one = _cfg(tmp_path / "one", data_dir, "finetune.workers=1", "num_threads=2")
    two = _cfg(tmp_path / "two", data_dir, "finetune.workers=2")
    run(one, tmp_path / "one" / "run", "task_arithmetic")
    run(two, tmp_path / "two" / "run", "task_arithmetic")
    a, b = _stored(one), _stored(two)
    for task in a:
        assert a[task].keys() == b[task].keys()
        for k in a[task]:
            assert torch.equal(a[task][k].view(torch.int32), b[task][k].view(torch.int32)), (task, k)
    assert {p.name for p in (tmp_path / "two" / "run").glob("finetune_*.log")} == \
        {"finetune_digits.log", "finetune_shapes.log", "finetune_colors.log"}
    assert torch.get_num_threads() == 2  # the run's own thread count is back after the one-thread fine-tunes


def test_a_failed_worker_names_its_task_and_the_others_are_kept(tmp_path, data_dir, monkeypatch):
    train = CLIPFamily.train

    def failing(self, task, module, work_dir):
        if task == "shapes":
            raise RuntimeError("simulated failure in the shapes fine-tune")
        return train(self, task, module, work_dir)

    monkeypatch.setattr(CLIPFamily, "train", failing)  # the forked workers inherit the patch
    cfg = _cfg(tmp_path, data_dir, "finetune.workers=2")
    with pytest.raises(finetune_workers.FinetuneFailed) as e:
        run(cfg, tmp_path / "run", "task_arithmetic")
    msg = str(e.value)
    assert "fine-tune of task 'shapes' failed: RuntimeError: simulated failure" in msg
    assert str(tmp_path / "run" / "finetune_shapes.log") in msg
    assert "digits" not in msg.splitlines()[0] and "in the store: digits, colors" in msg
    assert "Traceback" in (tmp_path / "run" / "finetune_shapes.log").read_text()
    fam = build_family(cfg, validate=False)
    assert fam.checkpoint("digits").is_file() and fam.checkpoint("colors").is_file()
    assert not fam.checkpoint("shapes").exists()
    assert not list(fam.checkpoint("shapes").parent.glob("*.safetensors"))  # nothing partial in the store


def test_a_worker_that_dies_is_reported(tmp_path, data_dir, monkeypatch):
    import os

    def dying(self, task, module, work_dir):
        os._exit(9)  # as the kernel's out-of-memory killer would end it: no exception, no message

    monkeypatch.setattr(CLIPFamily, "train", dying)
    with pytest.raises(finetune_workers.FinetuneFailed, match="a worker process died"):
        run(_cfg(tmp_path, data_dir, "finetune.workers=2"), tmp_path / "run", "task_arithmetic")


def test_workers_stay_out_of_every_key(make_cfg):
    a, b = make_cfg("finetune.workers=1"), make_cfg("finetune.workers=4")
    fa, fb = build_family(a, validate=False), build_family(b, validate=False)
    assert fa.checkpoint("digits") == fb.checkpoint("digits")
    assert keys.reference_key(a, {}) == keys.reference_key(b, {})
    assert keys.finetune_options(a.finetune) == keys.finetune_options(b.finetune)


def test_auto_is_a_worker_per_core_on_the_cpu_and_one_elsewhere(make_cfg):
    auto = "finetune.workers=auto"  # the default of conf/config.yaml (tests' make_cfg says 1)
    assert finetune_workers.workers(make_cfg(auto)) == finetune_workers.cores()
    assert finetune_workers.workers(make_cfg(auto, "trainer=gpu")) == 1
    assert finetune_workers.workers(make_cfg(auto, "trainer=ddp", "trainer.accelerator=cpu")) == 1


@pytest.mark.parametrize("overrides", [["trainer=gpu"], ["trainer=ddp", "trainer.accelerator=cpu"]])
def test_several_workers_are_refused_off_the_cpu_trainer(make_cfg, overrides):
    with pytest.raises(ConfigError, match=r"finetune.workers=2: .*set finetune.workers=1 or auto"):
        finetune_workers.check(make_cfg("finetune.workers=2", *overrides))


@pytest.mark.parametrize("value", [0, -1, "many", 1.5])
def test_a_bad_worker_count_is_refused(make_cfg, value):
    from fusion_bench.validation.check import check_options

    with pytest.raises(ConfigError, match="finetune.workers"):
        check_options(make_cfg(f"finetune.workers={value}"))
