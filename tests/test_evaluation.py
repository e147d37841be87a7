"""Evaluation runs where the trainer says (device, autocast precision) with the pool's DataLoader workers."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from fusion_bench.evaluation.accuracy import accuracy, eval_device, predictions


def _trainer(**kw):
    return OmegaConf.create({"accelerator": "cpu", "precision": "32-true", **kw})


def test_eval_device_follows_the_trainer():
    assert eval_device(_trainer()) == (torch.device("cpu"), None)
    assert eval_device(_trainer(precision="bf16-mixed")) == (torch.device("cpu"), torch.bfloat16)
    assert eval_device(_trainer(precision="16-mixed"))[1] == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU.*trainer=cpu"):
            eval_device(_trainer(accelerator="gpu", precision="bf16-mixed"))
        assert eval_device(_trainer(accelerator="auto")) == (torch.device("cpu"), None)


def test_trainer_gpu_without_a_gpu_is_a_config_error(make_cfg):
    from fusion_bench.families import build_family

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        build_family(make_cfg("trainer=gpu"))


def _model_and_data(n=300):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, 16, generator=g), torch.randn(16, 5, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, 5, generator=g)).argmax(-1)
    model = nn.Sequential(nn.Linear(16, 5))
    with torch.no_grad():
        model[0].weight.copy_(w.T)
        model[0].bias.zero_()
    return model.train(), TensorDataset(x, y), (x @ w).argmax(-1), y


def test_predictions_are_the_argmax_in_order_with_or_without_workers():
    model, data, expected, y = _model_and_data()
    pred, labels = predictions(model, data, batch_size=64)
    assert torch.equal(pred, expected) and torch.equal(labels, y)
    pred2, labels2 = predictions(model, data, batch_size=64, num_workers=2)
    assert torch.equal(pred2, expected) and torch.equal(labels2, y)
    assert model.training  # mode restored
    assert accuracy(model, data, 5, batch_size=64) == pytest.approx((expected == y).float().mean().item())


def test_autocast_runs_the_model_in_bf16():
    model, data, expected, _ = _model_and_data()
    dtypes = set()
    model.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    pred, _ = predictions(model, data, batch_size=64, autocast=torch.bfloat16)
    assert dtypes == {torch.bfloat16}
    assert (pred == expected).float().mean() > 0.95  # only near-ties flip
    dtypes.clear()
    predictions(model, data, batch_size=64)
    assert dtypes == {torch.float32}


@pytest.mark.slow
def test_bf16_mixed_run_end_to_end(make_cfg, tmp_path):
    """trainer=gpu's precision path on the CPU: bf16-mixed fine-tuning and bf16 autocast evaluation of a
    linearized (jvp) model."""
    from fusion_bench.families import build_family
    from fusion_bench.pipeline import run

    cfg = make_cfg("finetune=linear", "trainer.precision=bf16-mixed", "taskpool.tasks=[digits,textures]",
                   "method.scaling_coef=0.3", "model.train.steps=12", "model.train.warmup_steps=2", "model.train.lr=1e-3",
                   "model.train.batch_size=32", "model.train.checkpoint_every=6", "eval_precision=null")
    assert build_family(cfg).eval_where["autocast"] == torch.bfloat16  # eval_precision=null: the trainer's
    default = build_family(make_cfg("trainer.precision=bf16-mixed"))
    assert default.eval_where["autocast"] is None and default.eval_trainer.precision == "32-true"
    report = run(cfg, tmp_path / "run", "task_arithmetic")
    for t in ("digits", "textures"):
        row = report["tasks"][t]
        assert 0 <= row["merged"] <= 1 and row["finetuned"] > row["zeroshot"]
