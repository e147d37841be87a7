"""Fine-tuned encoders researchers already have (finetuned_from) are merged and evaluated without fine-tuning."""

import pytest
import torch
from safetensors.torch import save_file

from fusion_bench.clip.model import ImageClassifier, WeightsFormatError, load_clip
from fusion_bench.evaluation.accuracy import accuracy
from fusion_bench.families import build_family
from fusion_bench.pipeline import run
from fusion_bench.stages.finetune import ensure_finetuned, finetuned_state

TASKS = ["digits", "textures"]


def _fine_tunes(exp, tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    """Two 'published' fine-tunes of the tiny CLIP: one a whole CLIP in safetensors (open_clip keys), one an
    image-encoder state dict without the projection (as a CLIPVisionModel has none), saved with torch.save."""
    g = torch.Generator().manual_seed(0)
    visual = {k: v.detach().clone() for k, v in exp.encoder.state_dict().items()}
    tuned = {t: {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
                 for k, v in visual.items()} for t in TASKS}
    whole = {k: v.detach().clone() for k, v in load_clip(exp.cfg.model).state_dict().items()}
    whole.update({f"visual.{k}": v for k, v in tuned["digits"].items()})
    save_file({k: v.contiguous() for k, v in whole.items()}, str(tmp_path / "ft_digits.safetensors"))
    torch.save({k: v for k, v in tuned["textures"].items() if k != "proj"}, tmp_path / "ft_textures.pt")
    tuned["textures"]["proj"] = visual["proj"]  # the pretrained projection stays
    return tuned


def test_imported_fine_tunes_are_merged_without_training(make_cfg, tmp_path, monkeypatch):
    spec = {"digits": str(tmp_path / "ft_digits.safetensors"), "textures": str(tmp_path / "ft_textures.pt")}
    cfg = make_cfg(f"taskpool.tasks=[{','.join(TASKS)}]", "method=task_arithmetic", "method.scaling_coef=0.5",
                   "finetuned_from={digits:" + spec["digits"] + ",textures:" + spec["textures"] + "}")
    exp = build_family(cfg, validate=False)  # the files it names are written next
    tuned = _fine_tunes(exp, tmp_path)
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned an import"))
    report = run(cfg, tmp_path / "run", "task_arithmetic")

    # independent reference: load the weights into the encoder by hand and evaluate
    pre = {k: v.detach().clone() for k, v in exp.encoder.state_dict().items()}
    merged = {k: pre[k] + 0.5 * sum(tuned[t][k] - pre[k] for t in TASKS) for k in pre}

    def acc_with(state, task):
        enc = exp.encoder
        enc.load_state_dict(state)
        t = exp.tasks[task]
        out = accuracy(ImageClassifier(enc, exp.head(task)), t.split("test"), t.num_classes)
        enc.load_state_dict(pre)
        return out

    for t in TASKS:
        assert report["tasks"][t]["finetuned"] == pytest.approx(acc_with(tuned[t], t), abs=1e-6)
        assert report["tasks"][t]["merged"] == pytest.approx(acc_with(merged, t), abs=1e-6)
    assert report["seconds_per_step"] == {t: None for t in TASKS}
    assert all(report["tasks"][t]["finetuned"] != report["tasks"][t]["zeroshot"] for t in TASKS)  # weights changed


def test_template_path_hydra_override_and_errors(make_cfg, tmp_path):
    exp = build_family(make_cfg())
    _fine_tunes(exp, tmp_path)
    (tmp_path / "ft_textures.safetensors").symlink_to(tmp_path / "ft_digits.safetensors")
    cfg = make_cfg("taskpool.tasks=[digits,textures]", f"finetuned_from='{tmp_path}/ft_{{task}}.safetensors'")
    imported = build_family(cfg)
    assert imported.imported("textures") == tmp_path / "ft_textures.safetensors"
    assert imported.checkpoint("digits") != build_family(make_cfg()).checkpoint("digits")  # not a trained one
    assert finetuned_state(imported, "digits")  # any stage imports on demand

    with pytest.raises(ValueError, match="use finetune=standard"):
        build_family(make_cfg("finetune=lora", f"finetuned_from='{tmp_path}/ft_{{task}}.safetensors'"))
    build_family(make_cfg("finetune=linear", "finetune.posthoc=true", f"finetuned_from='{tmp_path}/ft_{{task}}.pt'",
                      "taskpool.tasks=[textures]"))  # tangent evaluation of standard fine-tunes
    with pytest.raises(ValueError, match=r"put \{task\}"):
        build_family(make_cfg("taskpool.tasks=[digits,textures]", f"finetuned_from={tmp_path}/ft_digits.safetensors"))
    with pytest.raises(FileNotFoundError, match="ft_shapes.safetensors"):
        build_family(make_cfg("taskpool.tasks=[digits,shapes]", f"finetuned_from='{tmp_path}/ft_{{task}}.safetensors'"))

    bad = {k: v for k, v in exp.encoder.state_dict().items() if k != "conv1.weight"}
    torch.save(bad, tmp_path / "ft_missing.pt")
    bad = dict(bad, **{"conv1.weight": torch.zeros(3, 3)})
    torch.save(bad, tmp_path / "ft_shape.pt")
    for name, match in (("missing", "missing keys \\['conv1.weight'\\]"), ("shape", "other shapes.*conv1.weight")):
        with pytest.raises(WeightsFormatError, match=match):
            ensure_finetuned(build_family(make_cfg("taskpool.tasks=[digits]",
                                                   f"finetuned_from={tmp_path}/ft_{name}.pt")), "digits")
