"""Fine-tuning modes: parameter selection on the real ViT-B/32 architecture, the NTK linearization, LoRA / L-LoRA."""

import copy

import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from fusion_bench.clip.model import create_clip
from fusion_bench.models.linearize import LinearizedModel
from fusion_bench.models.lora import LinearizedLoRA, LoRAEncoder, add_lora, lora_layers
from fusion_bench.models.modes import build_mode_model, eval_model, to_merge_space, trainable_state

D = 768  # ViT-B/32 width
BLOCKS = 12


def cfg(mode, **kw):
    return OmegaConf.create({"mode": mode, **kw})


@pytest.fixture(scope="module")
def vit_b32():
    """ViT-B/32 image encoder on the meta device: the real architecture, no memory, nothing downloaded."""
    return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, device="meta").visual


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(0)
    return create_clip("tiny-clip").visual.double().eval()


@pytest.fixture(scope="module")
def images64():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def n_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- parameter selection ----------------------------------------------------------------------------------------
def test_attention_mode_trains_only_attention_projections(vit_b32):
    m = build_mode_model(cfg("attention"), vit_b32)
    assert n_trainable(m) == BLOCKS * 4 * D**2 == 28_311_552
    names = set(trainable_state_names(m))
    assert names == {f"transformer.resblocks.{i}.attn.{w}" for i in range(BLOCKS)
                     for w in ("in_proj_weight", "out_proj.weight")}
    with_bias = build_mode_model(cfg("attention", train_bias=True), vit_b32)
    assert n_trainable(with_bias) == 28_311_552 + BLOCKS * 4 * D
    assert set(trainable_state_names(with_bias)) - names == {
        f"transformer.resblocks.{i}.attn.{b}" for i in range(BLOCKS) for b in ("in_proj_bias", "out_proj.bias")}


def test_linear_layers_mode_adds_mlp_weights_and_nothing_else(vit_b32):
    m = build_mode_model(cfg("linear_layers"), vit_b32)
    assert n_trainable(m) == BLOCKS * (4 * D**2 + 2 * D * 4 * D) == 84_934_656
    extra = set(trainable_state_names(m)) - set(trainable_state_names(build_mode_model(cfg("attention"), vit_b32)))
    assert extra == {f"transformer.resblocks.{i}.mlp.{c}.weight" for i in range(BLOCKS) for c in ("c_fc", "c_proj")}
    with_bias = build_mode_model(cfg("linear_layers", train_bias=True), vit_b32)
    assert n_trainable(with_bias) == 84_934_656 + BLOCKS * (4 * D + 4 * D + D)
    assert all(n.endswith(("weight", "bias")) and ".resblocks." in n for n in trainable_state_names(with_bias))
    # the input encoder is never modified
    assert not any(p.requires_grad is False for p in vit_b32.parameters())


def test_lora_adapts_every_block_attention_and_only_adapters_train(vit_b32):
    m = build_mode_model(cfg("lora", r=16, alpha=32), vit_b32)
    assert len(lora_layers(m)) == BLOCKS  # the MHA modules themselves: in_proj and out_proj both adapted
    r = 16
    assert n_trainable(m) == BLOCKS * (r * D + 3 * D * r + r * D + D * r) == 884_736
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable_state_names(m))


def trainable_state_names(m):
    return [n for n, p in m.named_parameters() if p.requires_grad]


# ---- NTK linearization ------------------------------------------------------------------------------------------
def test_linearized_model_is_the_first_order_expansion(tiny64, images64):
    x, f0 = images64, tiny64(images64)
    lin = LinearizedModel(copy.deepcopy(tiny64).requires_grad_(True)).eval()
    assert [n for n, _ in lin.named_parameters()] == [n for n, _ in tiny64.named_parameters()]
    with torch.no_grad():  # no-grad eval is where nn.MultiheadAttention would take its fused (non-jvp) fast path
        torch.testing.assert_close(lin(x), f0, rtol=0, atol=1e-12)

    theta0 = {n: p.detach().clone() for n, p in tiny64.named_parameters()}
    g = torch.Generator().manual_seed(2)
    d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std().clamp_min(0.02) for n, p in theta0.items()}

    def plain(eps):
        return torch.func.functional_call(tiny64, {n: theta0[n] + eps * d[n] for n in d}, (x,))

    def linear_at(eps):
        with torch.no_grad():
            for n, p in lin.named_parameters():
                p.copy_(theta0[n] + eps * d[n])
            return lin(x)

    eps = 1e-4
    jd = (plain(eps) - plain(-eps)) / (2 * eps)  # central difference: O(eps^2) error
    torch.testing.assert_close((linear_at(eps) - f0) / eps, jd, rtol=1e-6, atol=1e-6)
    # far from theta_0 the linearized model is not the network (a real linearization, not an identity)
    assert (linear_at(1.0) - plain(1.0)).abs().max() > 1e-2

    # affine in theta: task vectors add exactly
    t1 = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05 for n, p in theta0.items()}
    t2 = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05 for n, p in theta0.items()}

    def at(a, b):
        with torch.no_grad():
            for n, p in lin.named_parameters():
                p.copy_(theta0[n] + a * t1[n] + b * t2[n])
            return lin(x)

    torch.testing.assert_close(at(0.7, -1.3), f0 + 0.7 * (at(1, 0) - f0) - 1.3 * (at(0, 1) - f0),
                               rtol=1e-9, atol=1e-9)


def test_linearized_model_trains_every_parameter(tiny64, images64):
    lin = build_mode_model(cfg("linear"), tiny64)
    lin(images64).square().sum().backward()
    grads = {n: p.grad for n, p in lin.named_parameters()}
    assert set(grads) == set(trainable_state(lin)) == {n for n, _ in tiny64.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_linear_mode_evaluates_linearized_and_posthoc_trains_plain(tiny64, images64):
    enc = tiny64
    for c in (cfg("linear"), cfg("linear", posthoc=True)):
        theta0 = to_merge_space(c, enc, trainable_state(build_mode_model(c, enc)))
        assert set(theta0) == {n for n, _ in enc.named_parameters()}
        shifted = {k: v + 0.05 * torch.randn_like(v) for k, v in theta0.items()}
        model = eval_model(c, enc, shifted)
        assert isinstance(model, LinearizedModel)
        with torch.no_grad():
            torch.testing.assert_close(eval_model(c, enc, theta0)(images64), enc(images64), rtol=0, atol=1e-12)
            assert (model(images64) - enc(images64)).abs().max() > 1e-3
    assert not isinstance(build_mode_model(cfg("linear", posthoc=True), enc), LinearizedModel)


# ---- LoRA / L-LoRA ----------------------------------------------------------------------------------------------
def perturb(phi, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in phi.items()}


def test_lora_init_is_shared_by_every_task(tiny64):
    a = trainable_state(build_mode_model(cfg("lora", r=4, alpha=8), tiny64))
    torch.manual_seed(123)
    b = trainable_state(build_mode_model(cfg("lora", r=4, alpha=8), tiny64))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def full_precision_adapters(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def set_params(module, values):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in values:
                p.copy_(values[n])
    return module


def test_lora_delta_w_matches_peft_merge_and_unload(tiny64, images64):
    from peft import get_peft_model

    from fusion_bench.models.lora import lora_config

    c = cfg("lora", r=4, alpha=8, task_vector="delta_w")
    phi = perturb(trainable_state(build_mode_model(c, tiny64)))  # B != 0
    full = to_merge_space(c, tiny64, phi)
    w0 = dict(tiny64.named_parameters())
    assert set(full) == {f"transformer.resblocks.{i}.attn.{w}" for i in range(4)
                         for w in ("in_proj_weight", "out_proj.weight")}

    peft_model = get_peft_model(copy.deepcopy(tiny64), lora_config(c))
    missing, unexpected = peft_model.base_model.model.load_state_dict(phi, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    layers = dict(peft_model.base_model.model.named_modules())
    reference = dict(peft_model.merge_and_unload().named_parameters())
    for k, v in full.items():
        block = k.rsplit(".", 2)[0] if k.endswith("out_proj.weight") else k.rsplit(".", 1)[0]
        if k.endswith("in_proj_weight"):
            torch.testing.assert_close(v.double(), reference[k], rtol=1e-6, atol=1e-7)  # merge space is fp32
        else:  # peft 0.21 merge() adds the out_proj delta twice (huggingface/peft#3774): W0 + 2 dW there
            delta = layers[block + ".base_layer.out_proj"].get_delta_weight("default")
            torch.testing.assert_close(v.double(), w0[k] + delta, rtol=1e-6, atol=1e-7)
            assert any(torch.allclose(reference[k], w0[k] + c * delta) for c in (1, 2))
        assert not torch.equal(v.double(), w0[k])
    # the pretrained point of delta_w is W0 exactly
    zero = to_merge_space(c, tiny64, trainable_state(build_mode_model(c, tiny64)))
    assert all(torch.equal(v, w0[k].float()) for k, v in zero.items())


def test_lora_forward_is_w0_plus_scaled_ba(tiny64, images64):
    """The LoRA model (training and task_vector=adapters) computes the plain encoder at W0 + (alpha/r) B A."""
    adapters = cfg("lora", r=4, alpha=8, task_vector="adapters")
    delta_w = cfg("lora", r=4, alpha=8, task_vector="delta_w")
    model = build_mode_model(adapters, tiny64)
    phi = perturb(full_precision_adapters(model))
    set_params(model, phi)
    assert to_merge_space(adapters, tiny64, phi) is phi
    plain = eval_model(delta_w, tiny64, to_merge_space(delta_w, tiny64, phi))
    with torch.no_grad():
        torch.testing.assert_close(model(images64), plain(images64), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(eval_model(adapters, tiny64, phi)(images64), plain(images64),
                                   rtol=1e-10, atol=1e-10)
    model(images64).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="finetune.dropout"):
        build_mode_model(cfg("lora", dropout=0.1), tiny64)


@pytest.mark.parametrize("init", ["zero_b", "compensated"])
def test_l_lora_linearizes_the_lora_forward(tiny64, images64, init):
    x, f0 = images64, tiny64(images64)
    c = cfg("l_lora", r=4, alpha=8, init=init)
    lin = build_mode_model(c, tiny64)
    assert isinstance(lin, LinearizedLoRA)
    assert len(lora_layers(lin)) == len(tiny64.transformer.resblocks) == 4  # the targets really matched
    lora = LoRAEncoder(add_lora(copy.deepcopy(tiny64), c))  # the same adapters, not linearized
    phi0 = full_precision_adapters(lin)
    assert set(phi0) == set(trainable_state(lora)) and all(".lora_" in k for k in phi0)
    assert all(torch.equal(phi0[k], v) for k, v in full_precision_adapters(lora).items())
    with torch.no_grad():  # at phi_0: the pretrained encoder (compensated init included), linearized or not
        torch.testing.assert_close(lin(x), f0, rtol=0, atol=1e-9)
        torch.testing.assert_close(lora(x), f0, rtol=0, atol=1e-9)

    d = perturb({k: torch.zeros_like(v) for k, v in phi0.items()}, scale=0.05, seed=4)

    def at(model, eps):
        with torch.no_grad():
            return set_params(model, {n: phi0[n] + eps * d[n] for n in phi0})(x)

    eps = 1e-4
    jd = (at(lora, eps) - at(lora, -eps)) / (2 * eps)
    torch.testing.assert_close((at(lin, eps) - f0) / eps, jd, rtol=1e-6, atol=1e-6)
    # away from phi_0 the linearized forward is not the LoRA forward: no silent no-op
    assert (at(lin, 10) - at(lora, 10)).abs().max() > 1e-3
    assert (at(lin, 10) - f0).abs().max() > 1e-2


@pytest.mark.parametrize("init", ["zero_b", "compensated"])
def test_l_lora_a_gets_zero_gradient_iff_b_starts_at_zero(tiny64, images64, init):
    lin = build_mode_model(cfg("l_lora", r=4, alpha=8, init=init), tiny64)
    phi = full_precision_adapters(lin)
    set_params(lin, perturb(phi, scale=0.01))  # away from phi_0, where the tangent is not zero
    lin(images64).square().sum().backward()
    grads = {n: p.grad for n, p in lin.named_parameters() if p.requires_grad}
    a = [g for n, g in grads.items() if ".lora_A." in n]
    b = [g for n, g in grads.items() if ".lora_B." in n]
    assert len(a) == len(b) == 8  # in_proj and out_proj of 4 blocks
    assert all(g.abs().sum() > 0 for g in b)
    if init == "zero_b":
        assert all(torch.count_nonzero(g) == 0 for g in a)  # exactly zero: A never trains
    else:
        assert all(g.abs().sum() > 0 for g in a)


def test_l_lora_evaluation_merged_or_linearized(tiny64, images64):
    c = cfg("l_lora", r=4, alpha=8)
    phi0 = to_merge_space(c, tiny64, trainable_state(build_mode_model(c, tiny64)))
    phi = perturb(phi0, scale=0.2)
    with torch.no_grad():
        for linearized in (False, True):
            torch.testing.assert_close(eval_model(c, tiny64, phi0, linearized)(images64), tiny64(images64),
                                       rtol=0, atol=1e-6)
        merged, lin = eval_model(c, tiny64, phi)(images64), eval_model(c, tiny64, phi, linearized=True)(images64)
    assert isinstance(eval_model(c, tiny64, phi, linearized=True), LinearizedLoRA)
    assert not isinstance(eval_model(c, tiny64, phi), (LinearizedLoRA, LoRAEncoder))
    assert (merged - lin).abs().max() > 1e-4


def test_linearized_evaluation_needs_l_lora(tiny64):
    c = cfg("attention")
    theta = trainable_state(build_mode_model(c, tiny64))
    with pytest.raises(ValueError, match="use finetune=l_lora"):
        eval_model(c, tiny64, theta, linearized=True)
    with pytest.raises(ValueError, match="finetune.mode='bogus'"):
        build_mode_model(cfg("bogus"), tiny64)


def test_partial_linearization_method(make_cfg):
    from fusion_bench.merging.partial_linearization import partial_linearization
    from fusion_bench.stages.merge import Method

    pre = {"a": torch.zeros(3)}
    out = partial_linearization(pre, [{"a": torch.ones(3)}, {"a": 2 * torch.ones(3)}], scaling_coef=0.5)
    torch.testing.assert_close(out["a"], torch.full((3,), 1.5))
    fn = Method(make_cfg("finetune=l_lora", "method=partial_linearization").method, "l_lora")
    assert fn.func.requires_mode == "l_lora" and fn.evaluate_linearized is True
    with pytest.raises(ValueError, match="finetune=l_lora"):
        Method(make_cfg("finetune=lora", "method=partial_linearization").method, "lora")


@pytest.mark.parametrize("mode", ["lora", "l_lora"])
def test_lora_forward_leaves_plain_weights_so_the_model_can_move(tiny64, images64, mode):
    """peft's MultiheadAttention re-registers its base weights inside functional_call; after an L-LoRA jvp that
    left functorch-wrapped tensors behind and `.to(device)` (Lightning's teardown, GPU evaluation) failed."""
    model = build_mode_model(cfg(mode, r=4, alpha=8), tiny64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(images64).sum().backward()
    model.to("cpu")  # raised RuntimeError before (walking the modules first, e.g. to inspect them, hid the bug)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
