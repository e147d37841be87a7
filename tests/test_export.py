"""Merged models in the formats people load (output.format, fusion_bench.export): each export is read back by the
other library (open_clip.create_model(pretrained=FILE), transformers from_pretrained, peft PeftModel.from_pretrained)
and must give the features / logits of fusion_bench's own model at the merged weights (1e-5); the transformers key
mapping must invert the import exactly; the task-specific file must give back every task's weights bit for bit.
Tiny models only (tiny-clip, a 2-layer T5), nothing downloaded."""

import json
import math
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusion_bench.clip.hf_export import (
    NoTransformersEquivalent,
    hf_clip_config,
    open_clip_to_hf,
    save_hf_clip,
)
from fusion_bench.clip.hf_import import hf_to_open_clip
from fusion_bench.clip.model import create_clip, load_clip
from fusion_bench.export import OutputError
from fusion_bench.export.task_specific import (
    load_task_weights,
    pack_masks,
    read_task_specific,
    unpack_masks,
)
from fusion_bench.families import build_family
from fusion_bench.merging import emr_merging, tall_masks
from fusion_bench.pipeline import run
from fusion_bench.stages.export import export_merge
from fusion_bench.stages.merge import Method

TASKS = ["digits", "textures"]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= tol, err


def _noisy(state, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * (v.std().clamp_min(0.02) if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
            if v.is_floating_point() else v.clone() for k, v in state.items()}


def _images(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


# ---- the transformers key mapping is the exact inverse of the import ----------------------------------------------
def test_open_clip_to_hf_inverts_hf_import_tensor_for_tensor(one_thread):
    from transformers import CLIPModel

    torch.manual_seed(0)
    whole = {k: v.clone() for k, v in create_clip("tiny-clip").state_dict().items()}
    visual = {k: v for k, v in whole.items() if k.startswith("visual.")}
    no_proj = {k: v for k, v in visual.items() if k != "visual.proj"}
    for state in (whole, visual, no_proj):
        back = hf_to_open_clip(open_clip_to_hf(state))
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) and back[k].shape == state[k].shape for k in state)
    # and the other way round, from a transformers CLIPModel of the same architecture (its own key names)
    hf = {k: v for k, v in CLIPModel(hf_clip_config("tiny-clip")).state_dict().items() if "position_ids" not in k}
    again = open_clip_to_hf(hf_to_open_clip(hf))
    assert set(again) == set(hf) and all(torch.equal(again[k], hf[k]) for k in hf)
    with pytest.raises(ValueError, match="no transformers name"):
        open_clip_to_hf({**whole, "visual.attn_pool.query": torch.zeros(1)})


def test_transformers_configs_of_openai_architectures():
    # the published openai/clip-vit-base-patch32 and clip-vit-large-patch14 configs
    published = {"ViT-B-32-quickgelu": ((768, 3072, 12, 12, 32, 224), (512, 2048, 12, 8), 512),
                 "ViT-L-14-quickgelu": ((1024, 4096, 24, 16, 14, 224), (768, 3072, 12, 12), 768)}
    for arch, (vision, text, proj) in published.items():
        c = hf_clip_config(arch)
        v, t = c.vision_config, c.text_config
        assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size,
                v.image_size) == vision
        assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == text
        assert (t.max_position_embeddings, t.vocab_size, c.projection_dim) == (77, 49408, proj)
        assert v.hidden_act == t.hidden_act == "quick_gelu" and t.eos_token_id == 2  # argmax pooling, as OpenAI's
    assert hf_clip_config("ViT-B-32").vision_config.hidden_act == "gelu"
    with pytest.raises(NoTransformersEquivalent, match="ModifiedResNet"):
        hf_clip_config("RN50")
    with pytest.raises(NoTransformersEquivalent, match="timm_model_name"):
        hf_clip_config("ViT-B-16-SigLIP")


def test_vision_tower_alone_as_clip_vision_model(tmp_path, one_thread):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    model = create_clip("tiny-clip").eval()
    visual = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    x = _images()
    save_hf_clip(visual, "tiny-clip", tmp_path / "with_proj")
    save_hf_clip({k: v for k, v in visual.items() if k != "visual.proj"}, "tiny-clip", tmp_path / "plain")
    with torch.no_grad():
        _close(CLIPVisionModelWithProjection.from_pretrained(tmp_path / "with_proj")(pixel_values=x).image_embeds,
               model.visual(x))
        pooled = CLIPVisionModel.from_pretrained(tmp_path / "plain")(pixel_values=x).pooler_output
        _close(pooled @ model.visual.proj, model.visual(x))


# ---- CLIP through the pipeline: stage=merge of imported fine-tunes (no training) -------------------------------------
def _imported_merge(make_cfg, tmp_path):
    """Overrides for stage=merge of two fine-tuned image encoders on disk (finetuned_from), the family, and the
    by-hand task-arithmetic merge at 0.5."""
    overrides = [f"taskpool.tasks=[{','.join(TASKS)}]", "method=task_arithmetic", "method.scaling_coef=0.5",
                 f"finetuned_from='{tmp_path}/ft_{{task}}.safetensors'", "stage=merge"]
    fam = build_family(make_cfg(*overrides), validate=False)  # the files it names are written next
    pre = {k: v.detach().clone() for k, v in fam.encoder.state_dict().items()}
    tuned = {t: _noisy(pre, i) for i, t in enumerate(TASKS)}
    for t in TASKS:
        save_file(tuned[t], str(tmp_path / f"ft_{t}.safetensors"))
    merged = {k: pre[k] + 0.5 * sum(tuned[t][k] - pre[k] for t in TASKS) for k in pre}
    return overrides, fam, merged


def test_stage_merge_writes_open_clip_and_transformers_clip(make_cfg, tmp_path, one_thread):
    from transformers import CLIPImageProcessor, CLIPModel

    overrides, fam, merged = _imported_merge(make_cfg, tmp_path)
    own = fam.model_with(merged)  # fusion_bench's own encoder at the merged weights
    pretrained = load_clip(fam.cfg.model)
    x = _images()
    tokens = open_clip.get_tokenizer("tiny-clip")(["a photo of a cat", "a red circle", "the digit 7"])

    run(make_cfg(*overrides), tmp_path / "default", "task_arithmetic")  # the default: merge-space weights, as before
    assert [p.name for p in (tmp_path / "default").iterdir()] == ["merged.safetensors"]
    stored = load_file(tmp_path / "default/merged.safetensors")
    assert set(stored) == set(merged) and all(torch.allclose(stored[k], merged[k], atol=1e-6) for k in merged)
    run(make_cfg(*overrides, "output.format=null"), tmp_path / "none", "task_arithmetic")  # the opt-out
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())

    run(make_cfg(*overrides, "output.format=open_clip"), tmp_path / "oc", "task_arithmetic")
    file = tmp_path / "oc/merged_open_clip.safetensors"
    assert sorted(p.name for p in (tmp_path / "oc").iterdir()) == [file.name, "tiny-clip.json"]  # no temp files
    # open_clip alone (this package never imported) loads it with the config written beside it
    alone = ("import sys, open_clip, torch; open_clip.add_model_config(sys.argv[1]); "
             "m = open_clip.create_model('tiny-clip', pretrained=sys.argv[2]); "
             "assert not any(k.startswith('fusion_bench') for k in sys.modules); print(sum(p.numel() for p in m.parameters()))")
    done = subprocess.run([sys.executable, "-c", alone, str(tmp_path / "oc/tiny-clip.json"), str(file)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and int(done.stdout) > 0, done.stderr[-2000:]
    loaded = open_clip.create_model("tiny-clip", pretrained=str(file)).eval()  # open_clip's own loader
    with torch.no_grad():
        _close(loaded.encode_image(x), own(x))
        assert torch.equal(loaded.encode_text(tokens), pretrained.encode_text(tokens))
        assert torch.equal(loaded.logit_scale, pretrained.logit_scale)
    again = load_clip(OmegaConf.merge(fam.cfg.model, {"pretrained": str(file)}))  # fusion_bench reads it back too
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in again.state_dict().items())

    run(make_cfg(*overrides, "output.format=transformers"), tmp_path / "hf", "task_arithmetic")
    folder = tmp_path / "hf/merged_transformers"
    hf = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=x)
        img, txt = own(x), pretrained.encode_text(tokens)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        _close(out.image_embeds, img)
        _close(out.text_embeds, txt)
        _close(out.logits_per_image, pretrained.logit_scale.exp() * img @ txt.T, tol=1e-4)  # logits ~ 100 x cosine
    # the folder's image processor prepares an image as open_clip's own eval transform does
    from PIL import Image

    pp = fam.encoder.preprocess_cfg
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    ours = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"])(image)
    theirs = CLIPImageProcessor.from_pretrained(folder)(image, return_tensors="pt").pixel_values[0]
    _close(theirs, ours, tol=0.05)  # resampling differs by rounding only


@pytest.mark.parametrize("mode", ["attention", "lora", "l_lora"])
def test_clip_modes_export_the_evaluated_network(make_cfg, tmp_path, mode, one_thread):
    """Partial fine-tunes and LoRA (delta_w; l_lora's compensated adapters folded) as a whole open_clip CLIP."""
    lora = ["finetune.r=4", "finetune.alpha=8"] if "lora" in mode else []
    cfg = make_cfg("taskpool.tasks=[digits,textures]", f"finetune={mode}", *lora, "stage=merge",
                   "output.format=open_clip")
    fam = build_family(cfg)
    fts = [fam.to_merge_space(_noisy(fam.pretrained_trainable, s)) for s in (1, 2)]
    method = Method(cfg.method, fam.mode)
    merged = method(fam.pretrained_state, fts, 0.7)
    [path] = export_merge(fam, method, merged, tmp_path / "run", TASKS)
    loaded = open_clip.create_model("tiny-clip", pretrained=str(path)).eval()
    with torch.no_grad():
        _close(loaded.visual(_images()), fam.model_with(merged)(_images()))
        assert (loaded.visual(_images()) - fam.encoder(_images())).abs().max() > 1e-3  # the merge is in it


# ---- errors, before anything trains -------------------------------------------------------------------------------
def test_bad_output_options_stop_before_training(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("trained"))
    bad = {
        ("output.format=onnx",): r"output.format='onnx': expected one of \('safetensors', 'open_clip', "
                                 r"'transformers'\) or null",
        ("output.format=null", "output.adapters=true"): "nothing is written.*output.format=transformers",
        ("output.format=transformers", "model.arch=RN50-quickgelu"): r"RN50-quickgelu.*ModifiedResNet.*open_clip",
        ("output.format=open_clip", "finetune=linear"): "finetune=linear.*linearized.*output.format=safetensors",
        ("output.format=transformers", "finetune=l_lora", "method=partial_linearization"): "linearized LoRA",
        ("output.format=transformers", "output.adapters=true"): "finetune=standard merges full weights",
        ("output.format=open_clip", "output.adapters=true", "finetune=l_lora"): "needs output.format=transformers",
        ("output.format=transformers", "output.adapters=true", "finetune=l_lora"): "out_proj delta twice",
    }
    for overrides, match in bad.items():
        for stage in ("merge", "all"):
            with pytest.raises(OutputError, match=match):
                run(make_cfg("taskpool.tasks=[digits]", f"stage={stage}", *overrides), tmp_path / "r", "x")
    assert not (tmp_path / "r").exists() and not (tmp_path / "store").exists()
    build_family(make_cfg("output.format=onnx", "stage=finetune"))  # fine-tuning writes no merged model


def test_outputs_are_never_overwritten(make_cfg, tmp_path, one_thread):
    cfg = make_cfg("taskpool.tasks=[digits,textures]", "output.format=transformers", "stage=merge")
    fam = build_family(cfg)
    method = Method(cfg.method, fam.mode)
    merged = _noisy(fam.pretrained_state, 3)
    [folder] = export_merge(fam, method, merged, tmp_path, TASKS)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="merged_transformers exists: outputs are never overwritten"):
        export_merge(fam, method, _noisy(merged, 4), tmp_path, TASKS)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged_transformers"]  # no temp folder left behind
    fam.cfg.output.format = "safetensors"
    export_merge(fam, method, merged, tmp_path, TASKS)
    with pytest.raises(FileExistsError, match="merged.safetensors exists"):
        export_merge(fam, method, merged, tmp_path, TASKS)


# ---- task-specific merges: shared weights + bit-packed masks + rescalers ------------------------------------------
def test_mask_packing_is_numpys_little_endian_packbits():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (2, 8), (4, 3, 7), (2,)]:
        masks = torch.rand(shape, generator=g) > 0.5
        packed = pack_masks(masks)
        reference = np.packbits(masks.reshape(shape[0], -1).numpy(), axis=1, bitorder="little")
        assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), reference)
        assert torch.equal(unpack_masks(packed, tuple(shape[1:])), masks)


@pytest.mark.parametrize("method", ["emr", "tall_masks"])
def test_task_specific_file_gives_each_tasks_weights_back(make_cfg, tmp_path, method, one_thread):
    cfg = make_cfg("taskpool.tasks=[digits,textures,shapes]", f"method={method}", "stage=merge",
                   "output.format=open_clip")
    fam = build_family(cfg)
    tasks = list(cfg.taskpool.tasks)
    pre = fam.pretrained_state
    fts = [_noisy(pre, s) for s in range(3)]
    ts = emr_merging(pre, fts) if method == "emr" else tall_masks(pre, fts, lambdas=[0.2, 0.4, 0.6])
    written = export_merge(fam, Method(cfg.method, fam.mode), ts, tmp_path, tasks)
    path = tmp_path / "task_specific.safetensors"
    assert written == [path] + [tmp_path / f"merged_open_clip/{t}.safetensors" for t in tasks]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        key = next(k for k in f.keys() if k.startswith("masks."))  # noqa: SIM118
        n = fam.pretrained_state[key[len("masks."):]].numel()
        assert f.get_tensor(key).dtype == torch.uint8 and f.get_tensor(key).shape == (3, math.ceil(n / 8))
    assert json.loads(meta["tasks"]) == tasks and json.loads(meta["rescalers"]) == ts.rescalers
    for i, t in enumerate(tasks):
        want = ts.task_weights(i)
        for got in (load_task_weights(path, t, pre), load_task_weights(path, i, pre)):
            assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        model = open_clip.create_model("tiny-clip", pretrained=str(written[1 + i])).eval()
        with torch.no_grad():
            _close(model.visual(_images()), fam.model_with(want)(_images()))
    again = read_task_specific(path, pre)
    assert again.storage_summary() == ts.storage_summary()
    with pytest.raises(ValueError, match="merged from other pretrained weights"):
        load_task_weights(path, 0, _noisy(pre, 9))
    with pytest.raises(KeyError, match="has no task 'cars'"):
        load_task_weights(path, "cars", pre)


# ---- T5: transformers folder, peft adapter folder ----------------------------------------------------------------
WORDS = ["the", "a", "cat", "dog", "runs", "sleeps", "big", "small", "sentence1:", "sentence2:", "rte", "stsb",
         "entailment", "not_entailment"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A save_pretrained folder: a random 2-layer T5 with its own lm_head (as Flan-T5) + a word-level tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    path = tmp_path_factory.mktemp("tiny_t5")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.:_"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    return path


def _t5(make_cfg, tiny_t5, *overrides):
    cfg = make_cfg("model=tiny_t5", "taskpool=glue", "taskpool.tasks=[rte,stsb]", f"model.pretrained={tiny_t5}",
                   "method=task_arithmetic", "stage=merge", "output.format=transformers", *overrides)
    fam = build_family(cfg)
    method = Method(cfg.method, fam.mode)
    fts = [fam.to_merge_space(_noisy(fam.pretrained_trainable, s, scale=0.5)) for s in (1, 2)]
    return fam, method, method(fam.pretrained_state, fts, 0.6)


def _t5_inputs(fam):
    enc = fam.tokenizer(["rte sentence1: the cat runs. sentence2: a dog sleeps.", "stsb sentence1: the big dog"],
                        padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 7, 9], [0, 11, 4, 1]])
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "decoder_input_ids": dec}


def test_t5_merge_as_transformers_folder(make_cfg, tiny_t5, tmp_path, one_thread):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    # lora: W0 + s B A of q and v (delta_w); l_lora: compensated adapters folded into W
    for mode in (["finetune=standard"], ["finetune=lora", "finetune.r=4"], ["finetune=l_lora", "finetune.r=4"]):
        fam, method, merged = _t5(make_cfg, tiny_t5, *mode)
        [folder] = export_merge(fam, method, merged, tmp_path / fam.mode, ["rte", "stsb"])
        x = _t5_inputs(fam)
        with torch.no_grad():
            loaded = T5ForConditionalGeneration.from_pretrained(folder).eval()
            _close(loaded(**x).logits, fam.model_with(merged)(**x))
        text = "rte sentence1: the small cat."
        assert AutoTokenizer.from_pretrained(folder)(text).input_ids == fam.tokenizer(text).input_ids


@pytest.mark.parametrize("overrides", [["finetune=l_lora"], ["finetune=lora", "finetune.task_vector=adapters"]])
def test_t5_adapter_merge_as_peft_folder(make_cfg, tiny_t5, tmp_path, overrides, one_thread):
    """peft loads the merged adapters onto the unmodified pretrained T5 and gives fusion_bench's merged model:
    l_lora's compensated init as a rank-2r adapter, lora's zero_b adapters as they are."""
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    fam, method, merged = _t5(make_cfg, tiny_t5, *overrides, "finetune.r=4", "finetune.alpha=8",
                              "output.adapters=true")
    [folder] = export_merge(fam, method, merged, tmp_path, ["rte", "stsb"])
    assert folder.name == "merged_peft_adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "adapter_config.json").read_text())
    compensated = fam.mode_cfg.init == "compensated"
    assert (config["r"], config["lora_alpha"]) == ((8, 16.0) if compensated else (4, 8.0))
    x = _t5_inputs(fam)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(tiny_t5), folder).eval()
        _close(peft(**x).logits, fam.model_with(merged)(**x))
        # and the merge moved the model: the pretrained T5 alone gives other logits
        assert (T5ForConditionalGeneration.from_pretrained(tiny_t5)(**x).logits - peft(**x).logits).abs().max() > 1e-3
