"""Real CLIP architectures and checkpoint formats, with random weights (nothing downloaded)."""

import json
import os
import pickle

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from fusion_bench.clip import hf_import
from fusion_bench.clip import model as fclip
from fusion_bench.clip.model import WeightsFormatError, WeightsNotFoundError, create_clip, load_clip

transformers = pytest.importorskip("transformers")

VIT_B32_VISUAL_PARAMS = 87_849_216


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return create_clip("ViT-B-32-quickgelu").eval()


@pytest.fixture
def no_default_caches(monkeypatch, tmp_path):
    """Keep the user's ~/.cache/huggingface and ~/.cache/clip out of the search."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))


def test_vit_b32_shapes_and_parameter_count(vit_b32, make_cfg):
    cfg = make_cfg("model=vit_b32")
    assert cfg.model.arch == "ViT-B-32-quickgelu" and cfg.model.train.lr == 1e-5 and cfg.model.train.steps == 2000
    assert sum(p.numel() for p in vit_b32.visual.parameters()) == VIT_B32_VISUAL_PARAMS
    assert vit_b32.visual.image_size == (224, 224)
    assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in vit_b32.visual.transformer.resblocks)
    with torch.no_grad():
        img = vit_b32.encode_image(torch.randn(2, 3, 224, 224))
        txt = vit_b32.encode_text(open_clip.get_tokenizer(cfg.model.arch)(["a photo of a cat.", "a dog"]))
    assert img.shape == (2, 512) and txt.shape == (2, 512)
    for name, arch in (("vit_b16", "ViT-B-16-quickgelu"), ("vit_l14", "ViT-L-14-quickgelu")):
        assert make_cfg(f"model={name}").model.arch == arch
        fclip.check_quick_gelu(arch, "openai")


def test_plain_gelu_arch_with_openai_weights_is_refused():
    with pytest.raises(ValueError, match="ViT-B-32-quickgelu"):
        fclip.check_quick_gelu("ViT-B-32", "openai")


def test_hf_vision_model_converts_exactly(vit_b32):
    """A random transformers CLIPVisionModelWithProjection (ViT-B/32 config) == open_clip after conversion."""
    cfg = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, patch_size=32, image_size=224, projection_dim=512,
                                        hidden_act="quick_gelu")
    torch.manual_seed(1)
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    converted = hf_import.hf_to_open_clip(hf.state_dict())
    assert hf_import.guess_arch(converted) == "ViT-B-32-quickgelu"
    visual = {k[len("visual."):]: v for k, v in converted.items()}
    assert set(visual) == set(vit_b32.visual.state_dict())
    vit_b32.visual.load_state_dict(visual, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = vit_b32.visual(x)
        theirs = hf(pixel_values=x).image_embeds
    assert ours.shape == theirs.shape == (2, 512)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


SMALL = {"embed_dim": 32, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
         "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def small_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "fb-test-small.json"
    path.write_text(json.dumps(SMALL))
    open_clip.add_model_config(path)
    return "fb-test-small"


def test_hf_clip_folder_cli_and_load_clip(small_arch, tmp_path):
    """A transformers CLIPModel save_pretrained folder -> CLI -> safetensors -> load_clip: same image and text
    embeddings; load_clip also reads the transformers model.safetensors directly."""
    hf_cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 100, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "hidden_act": "quick_gelu",
                     "bos_token_id": 98, "eos_token_id": 99, "pad_token_id": 0},
        vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16, "hidden_act": "quick_gelu"},
        projection_dim=32,
    )
    torch.manual_seed(2)
    hf = transformers.CLIPModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "small.safetensors"
    assert hf_import.main([str(tmp_path / "hf"), str(out)]) == 0

    x = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(1, 90, (2, 16))
    tokens[0, 5], tokens[1, 15] = 99, 99  # the end-of-text token is the largest id (both pool at argmax)
    with torch.no_grad():
        ref_img = hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)
        ref_txt = hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)
    for source in (out, tmp_path / "hf" / "model.safetensors", tmp_path / "hf"):
        model = load_clip(OmegaConf.create({"name": "small", "arch": small_arch, "pretrained": str(source)}))
        with torch.no_grad():
            assert torch.allclose(model.encode_image(x), ref_img, atol=1e-5)
            assert torch.allclose(model.encode_text(tokens), ref_txt, atol=1e-5)
        assert torch.allclose(model.logit_scale, hf.logit_scale)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_formats_torchscript_torch_and_strictness(tmp_path):
    """OpenAI-style TorchScript archive and torch state dicts load exactly; partial / foreign files are refused."""
    torch.manual_seed(3)
    ref = create_clip("tiny-clip").eval()
    state = ref.state_dict()

    def cfg(path):
        return OmegaConf.create({"name": "t", "arch": "tiny-clip", "pretrained": str(path)})

    torch.jit.script(ref).save(str(tmp_path / "ts.pt"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "sd.pt")
    for path in (tmp_path / "ts.pt", tmp_path / "sd.pt"):
        got = load_clip(cfg(path)).state_dict()
        assert all(torch.equal(got[k], state[k]) for k in state)

    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("visual.")}, tmp_path / "visual.safetensors")
    with pytest.raises(WeightsFormatError, match="only an image encoder"):
        load_clip(cfg(tmp_path / "visual.safetensors"))
    partial = {k: v.contiguous() for k, v in state.items() if k != "ln_final.weight"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsFormatError, match="ln_final.weight"):
        load_clip(cfg(tmp_path / "partial.safetensors"))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module is never unpickled here
    with pytest.raises(WeightsFormatError, match="allow-unsafe-pickle"):
        load_clip(cfg(tmp_path / "module.pt"))


def test_missing_weights_error_lists_places_and_ways(make_cfg, tmp_path, no_default_caches):
    cache = tmp_path / "cache"
    cfg = make_cfg("model=vit_b32", f"paths.cache_dir={cache}")
    with pytest.raises(WeightsNotFoundError) as e:
        load_clip(cfg.model)
    msg = str(e.value)
    for place in fclip.weight_candidates("ViT-B-32-quickgelu", "openai", cache):
        assert str(place) in msg
    assert str(cache / "ViT-B-32-quickgelu-openai.safetensors") in msg
    assert "models--timm--vit_base_patch32_clip_224.openai" in msg and "ViT-B-32.pt" in msg
    assert "model.pretrained=" in msg and "paths.cache_dir=" in msg and "model.download=true" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_clip(make_cfg("model=vit_b32", f"model.pretrained={tmp_path / 'nope.safetensors'}").model)


def test_cache_dir_layouts_are_found(make_cfg, tmp_path, no_default_caches):
    cache = tmp_path / "cache"
    cfg = make_cfg("model=vit_b16", f"paths.cache_dir={cache}").model
    openai = cache / "ViT-B-16.pt"
    hub = cache / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "0123abc" / "open_clip_model.safetensors"
    flat = cache / "ViT-B-16-quickgelu-openai.safetensors"
    for path in (openai, hub, flat):  # each one found, the flat file preferred, then the hub cache
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        assert fclip.resolve_weights(cfg) == path
    default_hub = tmp_path / "hf_hub" / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "r"
    default_hub.mkdir(parents=True)
    (default_hub / "open_clip_model.safetensors").write_bytes(b"")
    assert fclip.resolve_weights(make_cfg("model=vit_b16", f"paths.cache_dir={tmp_path / 'empty'}").model) == (
        default_hub / "open_clip_model.safetensors")


def test_download_saves_flat_safetensors(tmp_path, monkeypatch, no_default_caches):
    """model.download=true: what open_clip fetched is loaded strictly and saved as <arch>-<tag>.safetensors."""
    ref = create_clip("tiny-clip")
    torch.save(ref.state_dict(), tmp_path / "fetched.pt")
    monkeypatch.setattr(fclip, "_download", lambda cfg, cache_dir: tmp_path / "fetched.pt")
    cfg = OmegaConf.create({"name": "tiny_dl", "arch": "tiny-clip", "pretrained": None, "pretrained_tag": "x",
                            "cache_dir": str(tmp_path / "cache"), "download": True})
    load_clip(cfg)
    flat = load_file(tmp_path / "cache" / "tiny-clip-x.safetensors")
    assert all(torch.equal(flat[k], v) for k, v in ref.state_dict().items())
    monkeypatch.undo()
    cfg.download = False
    cfg.cache_dir = str(tmp_path / "empty")
    with pytest.raises(WeightsNotFoundError):
        load_clip(cfg)


class ImageEncoder(nn.Module):
    """Like task-vectors' src/modeling.py ImageEncoder: torch.save(encoder) pickles this whole module."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train_preprocess = open_clip.image_transform(32, is_train=True)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_task_vectors_pickle_refused_without_flag_then_converted(tmp_path):
    torch.manual_seed(4)
    clip_model = create_clip("tiny-clip")
    torch.save(ImageEncoder(clip_model), tmp_path / "finetuned.pt")
    out = tmp_path / "finetuned.safetensors"
    with pytest.raises(hf_import.UnsafePickleRefused, match="arbitrary code"):
        hf_import.import_task_vectors_pickle(tmp_path / "finetuned.pt", out)
    assert not out.exists()
    assert hf_import.main([str(tmp_path / "finetuned.pt"), str(out)]) == 2 and not out.exists()

    hf_import.import_task_vectors_pickle(tmp_path / "finetuned.pt", out, allow_unsafe_pickle=True)
    got, ref = load_file(out), clip_model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    loaded = load_clip(OmegaConf.create({"name": "t", "arch": "tiny-clip", "pretrained": str(out)}))
    assert torch.equal(loaded.visual.conv1.weight, clip_model.visual.conv1.weight)

    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Evil(marker), f, protocol=2)
    torch.save(Evil(marker), tmp_path / "evil_zip.pt")
    for evil in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(ValueError, match="no tensors|could not be read"):
            hf_import.import_task_vectors_pickle(tmp_path / evil, tmp_path / "x.safetensors", allow_unsafe_pickle=True)
    assert not marker.exists()  # even with the flag, no pickled callable is ever run


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_published_clip_vision_model_folder_imports_as_a_fine_tune(small_arch, tmp_path, layout):
    """finetuned_from with a transformers CLIPVisionModel folder (the published eight-task fine-tunes' format):
    the imported encoder computes the transformers model's features; the projection, which a CLIPVisionModel
    lacks, stays the pretrained one. transformers 5 saves its keys as `embeddings...`; the published fine-tunes,
    saved by transformers 4, as `vision_model.embeddings...`."""
    from fusion_bench.clip.imported import import_encoder

    vcfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=16,
                                         hidden_act="quick_gelu")
    torch.manual_seed(3)
    hf = transformers.CLIPVisionModel(vcfg).eval()
    hf.save_pretrained(tmp_path / "clip-vit-small_digits")
    weights = tmp_path / "clip-vit-small_digits" / "model.safetensors"
    flat = {k.removeprefix("vision_model."): v for k, v in load_file(str(weights)).items()}
    save_file(flat if layout == "transformers5" else {f"vision_model.{k}": v for k, v in flat.items()}, str(weights))
    model = create_clip(small_arch).eval()
    pretrained = {k: v.detach().clone() for k, v in model.visual.named_parameters()}
    state = import_encoder(tmp_path / "clip-vit-small_digits", pretrained)
    assert set(state) == set(pretrained) and torch.equal(state["proj"], pretrained["proj"])
    model.visual.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.visual(x)
        theirs = hf(pixel_values=x).pooler_output @ pretrained["proj"]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
