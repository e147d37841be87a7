"""Every experiment of the seed papers as a command (issue 13): task negation, kernel behaviour, frozen vs trained
heads, the loss landscape, pairwise merges and the paper report. The end-to-end tests share one store of tiny
fine-tunes (two tasks, 4 steps; standard, standard with trained heads, lora) made once for the module; they
assert structure, ranges and consistency, never the tiny CLIP's accuracies."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from fusion_bench.analyses.negation import pick_negation_coef
from fusion_bench.clip.model import create_clip, head_logits
from fusion_bench.data import imagenet, tiny_control, tiny_images
from fusion_bench.data.eight_tasks import DatasetNotFoundError
from fusion_bench.data.imagenet_names import IMAGENET_WNIDS
from fusion_bench.evaluation.search import GRID
from fusion_bench.families import build_family
from fusion_bench.models.modes import build_mode_model, load_trainable, posthoc_linearized, trainable_state
from fusion_bench.pipeline import run
from fusion_bench.reporting import paper_report
from fusion_bench.reporting.summary import summarize

TASKS = ["colors", "position"]
FAST = [f"taskpool.tasks=[{','.join(TASKS)}]", "model.train.steps=4", "model.train.warmup_steps=1",
        "model.train.batch_size=16", "model.train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory, data_dir):
    """A store with the fine-tunes every analysis below needs, made once; `cfg(...)` composes the real configs."""
    root = tmp_path_factory.mktemp("paper")

    def cfg(*overrides):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("config", overrides=[f"paths.root={root}", f"paths.data={data_dir}", *FAST, *overrides])

    torch.set_num_threads(2)
    for extra in ([], ["finetune.train_head=true"], ["finetune=lora"]):
        run(cfg("stage=finetune", *extra), root / "finetune", "task_arithmetic")
    return SimpleNamespace(root=root, cfg=cfg)


def analyze(paper, name, *overrides, method="task_arithmetic", where=None):
    where = where or paper.root / "runs" / "-".join([name, method, *overrides]).replace("/", "_")
    result = run(paper.cfg("stage=analyze", f"analysis={name}", f"method={method}", *overrides), where, method)
    saved = json.loads((where / f"{name}.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (where / f"{name}.md").read_text().count("|") > 10
    assert saved["figures"] and all((where / f).stat().st_size > 10_000 for f in saved["figures"])
    return saved, where


# ---- 1. task negation: the rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target, control, pretrained, expected", [
    ([0.9, 0.7, 0.5, 0.3], [0.80, 0.79, 0.77, 0.70], 0.80, (0.5, True)),  # 0.77 >= 0.76, 0.70 < 0.76
    ([0.9, 0.7, 0.5, 0.3], [0.80, 0.80, 0.80, 0.80], 0.80, (0.75, True)),  # control never drops: the largest
    ([0.9, 0.5, 0.5, 0.6], [0.80, 0.80, 0.80, 0.80], 0.80, (0.25, True)),  # tie on target: the smaller lambda
    ([0.9, 0.7, 0.5, 0.3], [0.80, 0.50, 0.79, 0.10], 0.80, (0.5, True)),  # a non-monotone control curve
    ([0.9, 0.7, 0.5, 0.3], [0.70, 0.60, 0.50, 0.40], 0.80, (0.0, False)),  # none qualifies: lambda = 0, flagged
])
def test_negation_picks_the_lambda_of_the_rule(target, control, pretrained, expected):
    assert pick_negation_coef([0.0, 0.25, 0.5, 0.75], target, control, pretrained, keep=0.95) == expected


def test_negation_rule_refuses_curves_of_another_length():
    with pytest.raises(ValueError, match="4 grid points, 3 target"):
        pick_negation_coef([0.0, 0.25, 0.5, 0.75], [0.9, 0.7, 0.5], [0.8] * 4, 0.8)


# ---- 2. post-hoc linearization ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["standard", "attention", "linear_layers", "lora"])
def test_posthoc_linearization_is_the_encoder_at_theta0_and_its_jvp_matches_finite_differences(mode, one_thread):
    torch.manual_seed(0)
    encoder = create_clip("tiny-clip").visual.double().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ft_cfg = OmegaConf.create({"mode": mode, **({"r": 4, "alpha": 8, "init": "zero_b"} if mode == "lora" else {})})
    lin = posthoc_linearized(ft_cfg, encoder).eval()
    plain = build_mode_model(ft_cfg, encoder)
    assert set(lin.linearized_names) == set(trainable_state(plain))  # exactly the parameters the mode trains
    theta0 = {n: p.detach().clone() for n, p in plain.named_parameters() if p.requires_grad}  # fp64
    g = torch.Generator().manual_seed(2)
    d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta0.items()}
    norm = float(sum(v.pow(2).sum() for v in d.values()).sqrt())
    d = {k: 10 * v / norm for k, v in d.items()}  # ||d|| = 10 over every trained entry
    with torch.no_grad():
        f0 = encoder(x)
        torch.testing.assert_close(lin(x), f0, rtol=1e-10, atol=1e-10)  # at theta_0: the plain encoder

        def both(eps):  # (J d from the linearization, the finite difference (f(theta_0 + eps d) - f(theta_0)) / eps)
            moved = {k: theta0[k] + eps * d[k] for k in theta0}
            jd = (load_trainable(lin, moved)(x) - f0) / eps  # f_lin(theta_0 + eps d) - f0 = eps J d exactly
            return jd, (load_trainable(build_mode_model(ft_cfg, encoder).eval(), moved)(x) - f0) / eps

        (jd, fd), (jd_big, fd_big) = both(1e-6), both(1e-4)
    assert jd.abs().max() > 0.1  # the direction moves the outputs
    torch.testing.assert_close(jd_big, jd, rtol=1e-7, atol=1e-7)  # f_lin is linear: J d whatever the step
    torch.testing.assert_close(fd, jd, rtol=1e-4, atol=1e-4 * float(jd.abs().max()))
    # first order: the finite difference's error shrinks with the step (100x smaller step, >= 30x smaller error)
    assert (fd - jd).abs().max() * 30 < (fd_big - jd).abs().max()


def test_kernel_refuses_modes_that_are_linear_already():
    for mode in ("linear", "l_lora"):
        with pytest.raises(ValueError, match="linearized already"):
            posthoc_linearized(OmegaConf.create({"mode": mode}), create_clip("tiny-clip").visual)


# ---- 3. trained heads -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trained_heads_are_stored_reloaded_and_never_merged(paper):
    trained = build_family(paper.cfg("finetune.train_head=true"))
    frozen = build_family(paper.cfg())
    assert trained.checkpoint("colors") != frozen.checkpoint("colors")  # train_head is part of the key
    for t in TASKS:
        path = trained.store.head_path(trained.checkpoint(t))
        stored = load_file(path)
        assert set(stored) == {"head"} and stored["head"].shape == trained.zero_shot_head(t).shape
        assert not torch.equal(stored["head"], trained.zero_shot_head(t))  # it trained
        assert torch.equal(trained.head(t), stored["head"])  # the evaluated head is the stored one
        assert torch.equal(frozen.head(t), frozen.zero_shot_head(t))
        assert not any("head" in k for k in load_file(trained.checkpoint(t)))  # the fine-tune holds no head
    from fusion_bench.stages.finetune import finetuned_state
    from fusion_bench.stages.merge import Method

    merged = Method(trained.cfg.method, trained.mode)(trained.pretrained_state,
                                                      [finetuned_state(trained, t) for t in TASKS], 0.3)
    assert set(merged) == set(trained.pretrained_state) and not any("head" in k for k in merged)
    enc = trained.model_with(merged)
    data = trained.tasks["colors"].split("test")
    x, y = data.tensors
    with torch.no_grad():
        by_hand = (head_logits(enc(x), load_file(trained.store.head_path(trained.checkpoint("colors")))["head"])
                   .argmax(-1) == y).double().mean().item()
    assert trained.acc(enc, "colors", "test") == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.slow
def test_train_head_off_keeps_the_keys_of_earlier_stores_and_is_refused_where_it_cannot_be(paper):
    assert build_family(paper.cfg("~finetune.train_head")).checkpoint("colors") == \
        build_family(paper.cfg()).checkpoint("colors")
    with pytest.raises(ValueError, match="train_head"):
        build_family(paper.cfg("finetune.train_head=true", "finetuned_from='/nowhere/{task}'"))
    from fusion_bench.families import family_class

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        t5 = compose("config", overrides=["model=tiny_t5", "taskpool=glue", "finetune.train_head=true"])
    with pytest.raises(ValueError, match="T5 .* has no head"):
        family_class("t5").validate(t5)


# ---- control tasks ----------------------------------------------------------------------------------------------
def test_tiny_control_task_is_deterministic_balanced_pretraining_shapes():
    for split, n in (("val", 200), ("test", 500)):
        images, labels = tiny_control.make_split(split)
        again, _ = tiny_control.make_split(split)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8 and np.array_equal(images, again)
        assert np.bincount(labels).tolist() == [n // 6 + (i < n % 6) for i in range(6)]
    assert list(tiny_control.CLASSNAMES) == tiny_images.SHAPES
    assert not np.array_equal(tiny_control.make_split("val")[0][:10], tiny_control.make_split("test")[0][:10])
    with pytest.raises(KeyError, match="evaluated, never trained"):
        tiny_control.make_split("train")


def test_imagenet_control_reads_an_image_folder_by_wordnet_id(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "imagenet" / "val")):
        imagenet.load_split(tmp_path, "val", 32, (0.5,) * 3, (0.5,) * 3)
    wnids = [IMAGENET_WNIDS[i] for i in (3, 500, 999)]
    for w in wnids:
        (tmp_path / "imagenet" / "val" / w).mkdir(parents=True)
        for j in range(10):
            Image.new("RGB", (40, 30), (j * 20, 0, 0)).save(tmp_path / "imagenet" / "val" / w / f"{j}.JPEG")
    val, test = (imagenet.load_split(tmp_path, s, 32, (0.5,) * 3, (0.5,) * 3) for s in ("val", "test"))
    assert len(val) == 3 and len(test) == 27  # 10% of the 30 images carved as val, seed 0
    assert set(val.indices) | set(test.indices) == set(range(30)) and not set(val.indices) & set(test.indices)
    assert sorted(set(test.labels.tolist()) | set(val.labels.tolist())) == [3, 500, 999]
    x, y = test[0]
    assert x.shape == (3, 32, 32) and y in (3, 500, 999)


# ---- 4. every analysis end to end -------------------------------------------------------------------------------
@pytest.mark.slow
def test_negation_end_to_end(paper):
    res, _ = analyze(paper, "negation")
    assert res["control"] == tiny_control.NAME and res["grid"] == GRID and res["keep"] == 0.95
    for r in res["per_task"].values():
        assert r["scaling_coef"] in GRID and len(r["val"]["target"]) == len(r["val"]["control"]) == 21
        # theta(0) is the pretrained model: lambda = 0 always qualifies on val
        assert r["val"]["control"][0] == pytest.approx(res["control_pretrained_val"])
        assert r["constraint_met"]
        assert (r["scaling_coef"], True) == pick_negation_coef(GRID, r["val"]["target"], r["val"]["control"],
                                                               res["control_pretrained_val"], res["keep"])
        assert all(0 <= v <= 1 for v in (*r["test"].values(), *r["val"]["target"], *r["val"]["control"]))
    assert res["average"]["target"] == pytest.approx(np.mean([r["test"]["target"] for r in res["per_task"].values()]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["standard", "lora"])
def test_kernel_end_to_end(paper, mode):
    res, _ = analyze(paper, "kernel", f"finetune={mode}")
    assert list(res["per_task"]) == TASKS and res["finetune"] == mode
    for r in res["per_task"].values():
        assert all(0 <= r[k] <= 1 for k in ("acc_pretrained", "acc_finetuned", "acc_linearized"))
        assert r["gap"] == pytest.approx(r["acc_finetuned"] - r["acc_linearized"])
        assert 0 <= r["rel_dist_logits"] < np.inf and 0 <= r["rel_dist_features"] < np.inf


@pytest.mark.slow
def test_kernel_stops_before_evaluating_a_linear_mode(paper):
    with pytest.raises(ValueError, match="linearized already"):
        run(paper.cfg("stage=analyze", "analysis=kernel", "finetune=linear"), paper.root / "runs" / "klin", "ta")


@pytest.mark.slow
@pytest.mark.parametrize("analysis, tasks", [("loss_landscape", "[colors]"), ("heads", "[colors,digits]"),
                                             ("negation", "[textures]")])
def test_analyses_refuse_tasks_outside_the_pool(paper, analysis, tasks):
    with pytest.raises(ValueError, match=r"analysis.tasks=.*taskpool.tasks"):
        run(paper.cfg("stage=analyze", f"analysis={analysis}", f"analysis.tasks={tasks}"), paper.root / "bad", "ta")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["regmean", "tall_masks"])
def test_pairwise_refuses_methods_it_cannot_prepare(paper, method):
    with pytest.raises(ValueError, match="on the fine-tunes alone"):
        run(paper.cfg("stage=analyze", "analysis=pairwise", f"method={method}"), paper.root / "bad", method)


@pytest.mark.slow
def test_heads_end_to_end(paper):
    res, _ = analyze(paper, "heads", "analysis.grid_points=3", "analysis.split=val", "analysis.scaling_coef=0.3")
    assert res["grid"] == [-2.0, 0.0, 2.0] and res["pair"] == TASKS
    for kind in ("frozen", "trained"):
        r = res[kind]
        xi, rep = np.asarray(r["xi"]), np.asarray(r["xi_rep"])
        assert xi.shape == rep.shape == (3, 3) and (0 <= xi).all() and (xi <= 2).all() and (rep >= -1e-9).all()
        assert xi[1, 1] == 0 and rep[1, 1] == pytest.approx(0, abs=1e-9)  # theta_0 against itself
        assert r["xi_mean"] == pytest.approx(xi.mean()) and r["scaling_coef"] == 0.3
        assert all(v["normalized"] == pytest.approx(v["merged"] / v["finetuned"]) for v in r["tasks"].values())
    assert res["frozen"]["xi"] != res["trained"]["xi"] or res["frozen"]["xi_rep"] != res["trained"]["xi_rep"]


@pytest.mark.slow
def test_loss_landscape_end_to_end(paper):
    from fusion_bench.analyses.outputs import task_outputs

    res, _ = analyze(paper, "loss_landscape", "analysis.grid_points=3", "analysis.low=0.0", "analysis.high=1.0",
                     "analysis.split=val")
    joint = np.asarray(res["joint_loss"])
    per = [np.asarray(res["loss"][t]) for t in TASKS]
    np.testing.assert_allclose(joint, per[0] + per[1])
    i, j = np.unravel_index(joint.argmin(), joint.shape)
    assert res["minimum"] == {"lambda": [res["grid"][i], res["grid"][j]], "joint_loss": pytest.approx(joint[i, j])}
    fam = build_family(paper.cfg())  # at (0, 0): the pretrained model's cross-entropy
    assert per[0][0, 0] == pytest.approx(task_outputs(fam, fam.encoder, TASKS[0], "val").loss.mean().item(), rel=1e-5)


@pytest.mark.slow
def test_pairwise_end_to_end_and_the_sweep_plot(paper):
    sweep = paper.root / "pairwise_sweep"
    for i, method in enumerate(("task_arithmetic", "ties")):
        res, _ = analyze(paper, "pairwise", method=method, where=sweep / str(i))
        (pair,) = res["pairs"]
        assert pair["tasks"] == TASKS and pair["scaling_coef"] in GRID
        assert all(0 <= a <= 1 for a in pair["accuracy"]) and res["mean_normalized"] == pytest.approx(
            np.mean(pair["normalized"]))
    summarize(sweep)  # what the multirun callback does
    assert (sweep / "pairwise_tiny_clip.png").stat().st_size > 10_000
    table = (sweep / "pairwise_summary.md").read_text()
    assert "task_arithmetic (standard)" in table and "ties (standard)" in table


@pytest.mark.slow
def test_cosine_writes_its_table(paper):
    res, where = analyze(paper, "cosine")
    assert np.allclose(np.diag(res["cosine"]), 1.0) and 0 <= res["mean_abs_off_diagonal"] <= 1
    run(paper.cfg("stage=analyze", "analysis=cosine"), where, "task_arithmetic")  # a second run into the folder
    assert (where / "cosine-1.json").is_file() and (where / "cosine.json").is_file()  # nothing overwritten


# ---- 6. the paper report ----------------------------------------------------------------------------------------
def _write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))


def _runs(tmp_path, att_xi, att_gap, heads_trained_xi, neg_target):
    m = {"model": "tiny_clip", "taskpool": "tiny_eight", "method": "task_arithmetic"}
    for mode in ("standard", "linear"):  # every mode's negation run counts
        _write(tmp_path / f"neg_{mode}", "negation", {
            **m, "kind": "negation", "finetune": mode, "tasks": ["a", "b"], "control": "c", "keep": 0.95,
            "average": {"target_pretrained": 0.6, "target": neg_target, "control": 0.78, "control_pretrained": 0.8,
                        "control_kept": 0.975}})
    for mode, xi, norm, gap in (("standard", 0.7, 0.5, 0.1), ("attention", att_xi, 0.6, att_gap),
                                ("linear", 0.5, 0.55, None)):
        _write(tmp_path / f"dis_{mode}", "disentanglement", {**m, "kind": "disentanglement", "finetune": mode,
                                                              "tasks": ["a", "b"], "grid": [0, 1], "xi": [[xi] * 2] * 2})
        _write(tmp_path / f"num_{mode}", "num_tasks", {**m, "kind": "num_tasks", "finetune": mode, "num_tasks": [2],
                                                        "normalized": [norm], "scaling_coefs": [[0.3]]})
        if gap is not None:
            _write(tmp_path / f"ker_{mode}", "kernel", {**m, "kind": "kernel", "finetune": mode, "per_task": {
                "a": {"gap": gap}, "b": {"gap": -gap}}, "average": {"rel_dist_logits": gap}})
    heads = {"average": {"normalized": 0.5}, "xi_rep_mean": 0.01}
    _write(tmp_path / "heads", "heads", {**m, "kind": "heads", "finetune": "standard", "pair": ["a", "b"],
                                         "frozen": {**heads, "xi_mean": 0.5},
                                         "trained": {**heads, "xi_mean": heads_trained_xi}})


def test_paper_report_verdicts_follow_the_numbers(tmp_path):
    _runs(tmp_path / "good", att_xi=0.6, att_gap=0.05, heads_trained_xi=0.9, neg_target=0.3)
    text = paper_report.write_paper_report([tmp_path / "good"]).read_text()
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in text.splitlines() if line.startswith("| ") and
                line[2].isdigit()]
    assert verdicts == ["**holds**"] * 5
    assert "- check: standard: target accuracy falls: yes" in text
    assert "- check: linear: control keeps >= 95%: yes" in text
    _runs(tmp_path / "bad", att_xi=0.8, att_gap=0.2, heads_trained_xi=0.4, neg_target=0.7)
    bad = paper_report.write_paper_report([tmp_path / "bad"])
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in bad.read_text().splitlines()
                if line.startswith("| ") and line[2].isdigit()]
    # negation: control kept but target up; attention: xi up but normalized up; kernel and heads reversed
    assert verdicts == ["**partly holds**", "**holds**", "**partly holds**", "**does not hold**", "**does not hold**"]
    _runs(tmp_path / "tie", att_xi=0.698, att_gap=0.05, heads_trained_xi=0.503, neg_target=0.3)
    tie = paper_report.write_paper_report([tmp_path / "tie"]).read_text()
    assert "xi attention < standard: no" in tie and "xi trained > frozen: no" in tie  # within the margin: no evidence
    again = paper_report.write_paper_report([tmp_path / "bad"])
    assert again.name == "paper_report-1.md" and bad.is_file()  # never over an earlier report
    empty = tmp_path / "empty"
    empty.mkdir()
    assert paper_report.write_paper_report([empty]).read_text().count("**not measured**") == 5


@pytest.mark.slow
def test_paper_report_on_real_runs(paper):
    """Over whatever analyses of this module have run: it reads them, copies their figures and gives verdicts."""
    if not list((paper.root / "runs").rglob("cosine.json")):  # run alone: one analysis to report on
        analyze(paper, "cosine")
    out = paper_report.write_paper_report([paper.root / "runs"], paper.root / "report")
    text = out.read_text()
    assert text.count("\n| ") == 6  # header row + five claims
    assert "tiny_clip / tiny_eight" in text and "figures/" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figures and all((out.parent / name).stat().st_size > 10_000 for name in figures)
