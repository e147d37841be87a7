"""Input Grams and diagonal Fishers against brute-force passes written here."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fisher_close as assert_fisher_close_within
from helpers import classification_batches, tiny_classifier
from torch import nn

from fusion_bench.statistics import diagonal_fisher, input_grams, mha_out_proj_input

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # vmap through CPU flash attention: torch's batching fallback warns about speed only
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


def tiny_vit(seed: int = 0) -> open_clip.transformer.VisionTransformer:
    torch.manual_seed(seed)
    vit = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2, output_dim=16
    )
    with torch.no_grad():  # non-trivial biases / norms so that every input matters
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the out_proj input of nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool", "3d", "padding"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_out_proj_input_gives_mha_output(batch_first, mask, need_weights):
    torch.manual_seed(0)
    B, L, E, H = 3, 5, 16, 4
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    kw = {"need_weights": need_weights}
    if mask == "float":
        kw["attn_mask"] = torch.randn(L, L)
    elif mask == "bool":
        kw["attn_mask"] = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)  # causal
    elif mask == "3d":
        kw["attn_mask"] = torch.randn(B * H, L, L)
    elif mask == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * L, [False] * 3 + [True] * 2, [True] + [False] * 4])
    for grad in (True, False):  # no_grad + eval + batch_first takes torch's fast path
        with torch.set_grad_enabled(grad):
            want = mha(x, x, x, **kw)[0]
            got = F.linear(mha_out_proj_input(mha, x, x, x, **kw), mha.out_proj.weight, mha.out_proj.bias)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mha_out_proj_input_cross_attention_and_unbatched():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    got = F.linear(mha_out_proj_input(mha, q, kv, kv), mha.out_proj.weight, mha.out_proj.bias)
    torch.testing.assert_close(got, mha(q, kv, kv)[0], atol=1e-5, rtol=0)
    u = torch.randn(4, 8)  # unbatched [L, E]
    got = F.linear(
        mha_out_proj_input(mha, u, u, u, need_weights=False), mha.out_proj.weight, mha.out_proj.bias
    )
    torch.testing.assert_close(got, mha(u, u, u, need_weights=False)[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Grams
# ---------------------------------------------------------------------------------------------
def brute_force_inputs(vit, x):
    """open_clip's VisionTransformer forward written out by hand; returns (output, {key: [inputs]})."""
    ins: dict[str, list[torch.Tensor]] = {}
    h = vit._embeds(x)  # [B, L, D], batch first
    for i, r in enumerate(vit.transformer.resblocks):
        p = f"transformer.resblocks.{i}."
        a, mlp = r.attn, r.mlp
        y = r.ln_1(h)
        ins.setdefault(p + "attn.in_proj_weight", []).append(y)
        q, k, v = F.linear(y, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        B, L, D = q.shape
        q, k, v = (t.reshape(B, L, a.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        o = (w @ v).transpose(1, 2).reshape(B, L, D)
        ins.setdefault(p + "attn.out_proj.weight", []).append(o)
        h = h + r.ls_1(a.out_proj(o))
        y = r.ln_2(h)
        ins.setdefault(p + "mlp.c_fc.weight", []).append(y)
        m = mlp.gelu(mlp.c_fc(y))
        ins.setdefault(p + "mlp.c_proj.weight", []).append(m)
        h = h + r.ls_2(mlp.c_proj(m))
    pooled, _ = vit._pool(h)
    ins["proj"] = [pooled]
    return pooled @ vit.proj, ins


def gram_of(xs):
    """sum x x^T over every row (token) of the inputs xs, divided by the number of rows."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    return x.T @ x / x.shape[0]


def test_grams_of_open_clip_vit_match_brute_force():
    vit, x = tiny_vit(), images(7)
    batches = [x[:3], x[3:]]
    outs = []
    with torch.no_grad():
        want_out, ins = brute_force_inputs(vit, x)
        torch.testing.assert_close(want_out, vit(x), atol=1e-5, rtol=0)  # the brute force is the forward
        grams, n = input_grams(vit, batches, forward=lambda m, b: outs.append(m(b)))
    assert n == 7
    assert list(grams) == [k for k, _ in vit.named_parameters() if k in ins]  # parameter order
    assert set(grams) == set(ins)  # out_proj and proj included, nothing else (conv1 is no linear map)
    assert grams["proj"].shape == (32, 32) and grams["transformer.resblocks.0.mlp.c_proj.weight"].shape == (
        64,
        64,
    )
    for key, xs in ins.items():
        assert grams[key].dtype == torch.float32
        torch.testing.assert_close(grams[key].double(), gram_of(xs), rtol=1e-4, atol=1e-5, msg=key)
    # per token: a block's maps read 7 images x 17 tokens, proj reads 7 pooled rows; over samples the block Grams
    # would be 17x larger, the same factor for every task of a ViT (RegMean's merge does not change)
    assert sum(t.reshape(-1, t.shape[-1]).shape[0] for t in ins["transformer.resblocks.1.mlp.c_fc.weight"]) == 7 * 17
    assert sum(t.reshape(-1, t.shape[-1]).shape[0] for t in ins["proj"]) == 7
    torch.testing.assert_close(torch.cat(outs), want_out, atol=1e-5, rtol=0)  # hooks leave the output alone


def test_grams_restore_hooks_modes_and_proj_even_on_error():
    vit = tiny_vit()
    vit.train()
    vit.transformer.resblocks[0].eval()
    modes = [m.training for m in vit.modules()]
    proj = vit.proj
    with pytest.raises(RuntimeError):  # conv1 fails after the proj pre-hook set proj to None
        input_grams(vit, [torch.randn(2, 5, 32, 32)])
    for _ in range(2):
        assert vit.proj is proj
        assert [m.training for m in vit.modules()] == modes
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())
        input_grams(vit, [images(2)])


def test_grams_of_linear_stack_with_tokens_and_keys():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(6, 4, 5)  # 6 samples of 4 tokens
    batches = [(x[:2], 0), (x[2:], 0)]
    grams, n = input_grams(net, batches, forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]))
    assert n == 6 and list(grams) == ["0.weight", "2.weight"]
    torch.testing.assert_close(grams["0.weight"].double(), gram_of([x]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            grams["2.weight"].double(), gram_of([net[1](net[0](x))]), rtol=1e-5, atol=1e-6
        )
    only, _ = input_grams(
        net, batches, forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]), keys=["2.weight"]
    )
    assert list(only) == ["2.weight"]
    torch.testing.assert_close(only["2.weight"], grams["2.weight"])
    with pytest.raises(ValueError, match="'0.bias'"):
        input_grams(net, [x], keys=["0.bias"])
    with pytest.raises(ValueError, match="no samples"):
        input_grams(net, [])


class _TokenNet(nn.Module):
    """Embedding -> Linear -> tanh -> Linear over padded token ids (the pad id 0 has a non-zero embedding)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.l1, self.l2 = nn.Embedding(11, 5), nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, ids):
        return self.l2(torch.tanh(self.l1(self.emb(ids))))


def _padded(seqs, size):
    """Batches of `size` sequences, each padded (id 0) to the longest of its batch."""
    out = []
    for s in range(0, len(seqs), size):
        part = seqs[s:s + size]
        ids = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)
        for i, q in enumerate(part):
            ids[i, :len(q)] = torch.tensor(q)
        out.append((ids, ids != 0))
    return out


def test_grams_are_means_over_counted_tokens_of_padded_batches():
    """Brute force: sum x x^T over every real token of every sequence / the number of tokens; the same from
    batches padded to different lengths with `positions` marking the real tokens, whatever the batching;
    without `positions` every padded row counts (divided by the rows, not the samples)."""
    net = _TokenNet().eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 11, (n,), generator=g).tolist() for n in (2, 9, 4, 1, 6, 3, 8)]
    with torch.no_grad():
        e = torch.cat([net.emb(torch.tensor(q)) for q in seqs]).double()  # every real token: 33 rows
        h = torch.tanh(net.l1(e.float())).double()
    want = {"l1.weight": e.T @ e / len(e), "l2.weight": h.T @ h / len(h)}
    assert len(e) == 33

    def real(key, b):
        return b[1]

    for size in (1, 2, 3, 7):
        grams, n = input_grams(net, _padded(seqs, size), forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]),
                               positions=real)
        assert n == 7 and set(grams) == set(want)
        for k, w in want.items():
            torch.testing.assert_close(grams[k].double(), w, rtol=1e-5, atol=1e-7, msg=f"{size}: {k}")
    batches = _padded(seqs, 3)
    every, _ = input_grams(net, batches, forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]))
    with torch.no_grad():
        rows = torch.cat([net.emb(b[0]).reshape(-1, 5) for b in batches]).double()
    assert len(rows) == 3 * 9 + 3 * 6 + 1 * 8
    torch.testing.assert_close(every["l1.weight"].double(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-7)
    run = {"forward": lambda m, b: m(b[0]), "size": lambda b: len(b[0])}
    with pytest.raises(ValueError, match=r"positions\('l1.weight', batch\) gave a torch.int64 mask"):
        input_grams(net, batches, **run, positions=lambda k, b: b[1].long())
    with pytest.raises(ValueError, match=r"must be a bool tensor of shape \(3, 9\)"):
        input_grams(net, batches, **run, positions=lambda k, b: b[1][:, :2])
    with pytest.raises(ValueError, match="counted no position of the input of 'l2.weight'"):
        input_grams(net, batches, **run, positions=lambda k, b: b[1] & (k == "l1.weight"))


def test_grams_of_open_clip_custom_attention():
    torch.manual_seed(0)
    attn = open_clip.transformer.Attention(8, num_heads=2).eval()
    x = torch.randn(3, 5, 8)
    grams, n = input_grams(attn, [x])
    assert set(grams) == {"in_proj_weight", "out_proj.weight"} and n == 3
    torch.testing.assert_close(grams["in_proj_weight"].double(), gram_of([x]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fishers
# ---------------------------------------------------------------------------------------------
def reference_fisher(model, batches, target, seed=0, ll=None):
    """Per-sample autograd loop; y drawn per batch from softmax(model(x)) with one CPU generator."""
    ll = ll or (lambda m, x, y: F.log_softmax(m(x), -1).gather(-1, y.reshape(-1, 1)).squeeze(-1))
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    n = 0
    for x, y in batches:
        if target == "sample":
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(model(x), -1), 1, generator=gen).squeeze(-1)
        for i in range(len(x)):
            g = torch.autograd.grad(ll(model, x[i : i + 1], y[i : i + 1]).sum(), list(params.values()))
            for k, gk in zip(params, g):
                acc[k] += gk.double() ** 2
        n += len(x)
    return {k: v / n for k, v in acc.items()}, n


def mlp(seed=0):
    return tiny_classifier(seed, classes=3)


def assert_fisher_close(got, want):
    assert_fisher_close_within(got, want, atol=1e-9)


@pytest.mark.parametrize("target", ["sample", "label"])
def test_fisher_of_mlp_matches_per_sample_loop(target):
    model, batches = mlp(), classification_batches()
    got, n = diagonal_fisher(model, batches, None, target=target, seed=3, chunk=2)
    want, n_ref = reference_fisher(model, batches, target, seed=3)
    assert n == n_ref == 9
    assert_fisher_close(got, want)


@pytest.mark.parametrize("target", ["sample", "label"])
def test_fisher_of_open_clip_vit_with_head_matches_per_sample_loop(target, caplog):
    model = nn.Sequential(tiny_vit(), nn.Linear(16, 5)).eval()
    batches = classification_batches(sizes=(3, 2), shape=(3, 32, 32), classes=5)
    with caplog.at_level(logging.WARNING, logger="fusion_bench.statistics.fisher"):
        got, n = diagonal_fisher(model, batches, None, target=target, chunk=2)
    assert "vmap failed" not in caplog.text  # vmap runs through nn.MultiheadAttention
    want, _ = reference_fisher(model, batches, target)
    assert n == 5
    assert_fisher_close(got, want)


def test_fisher_is_not_the_squared_batch_gradient():
    model, batches = mlp(), classification_batches(sizes=(9,))
    got, _ = diagonal_fisher(model, batches, None, target="label")
    x, y = batches[0]
    ll = F.log_softmax(model(x), -1).gather(-1, y[:, None]).mean()
    sq = {
        k: g**2
        for k, g in zip(dict(model.named_parameters()), torch.autograd.grad(ll, list(model.parameters())))
    }
    assert not torch.allclose(got["0.weight"], sq["0.weight"], rtol=0.1)
    assert (got["0.weight"] >= sq["0.weight"] - 1e-7).all()  # mean of squares >= square of mean


def test_fisher_sampling_uses_the_seed_and_restores_modes():
    model, batches = mlp(), classification_batches(sizes=(16,))
    model.train()
    a, _ = diagonal_fisher(model, batches, None, seed=5)
    b, _ = diagonal_fisher(model, batches, None, seed=5)
    c, _ = diagonal_fisher(model, batches, None, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["2.weight"], c["2.weight"])
    assert all(m.training for m in model.modules())


def test_fisher_keys_custom_log_likelihood_and_loop_fallback(caplog):
    torch.manual_seed(0)
    emb, head = nn.Embedding(7, 6), nn.Linear(6, 7)
    seq = nn.Sequential(emb, nn.Tanh(), head).eval()  # a "sequence model": logits [B, T, V]

    def seq_ll(m, x, y):  # per sample: sum of the target tokens' log-probabilities
        return F.log_softmax(m(x), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).sum(-1)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 7, (4, 5), generator=g), torch.randint(0, 7, (4, 5), generator=g))]
    got, n = diagonal_fisher(seq, batches, seq_ll, keys=["2.weight"], target="label", chunk=3)
    want, _ = reference_fisher(seq, batches, "label", ll=seq_ll)
    assert n == 4 and list(got) == ["2.weight"]
    torch.testing.assert_close(got["2.weight"].double(), want["2.weight"], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="needs `sample`"):
        diagonal_fisher(seq, batches, seq_ll)
    with pytest.raises(ValueError, match="'nope'"):
        diagonal_fisher(seq, batches, seq_ll, keys=["nope"], target="label")

    class DataDependent(nn.Module):  # `if` on a tensor value: vmap cannot run it, the loop can
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x) * (2.0 if x.sum() > 0 else 1.0)

    model, batches = DataDependent().eval(), classification_batches()
    with caplog.at_level(logging.WARNING, logger="fusion_bench.statistics.fisher"):
        got, _ = diagonal_fisher(model, batches, None, target="label", epsilon=1e-12)
    assert "vmap failed" in caplog.text
    want, _ = reference_fisher(model, batches, "label")
    assert_fisher_close(got, {k: v.clamp_min(1e-12) for k, v in want.items()})


class _TiedClassifier(nn.Module):
    """Token embedding and output head sharing one weight (as T5's shared / embed_tokens / lm_head), three names."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.embed = nn.Embedding(5, 4)
        self.embed.weight.data = torch.randn(5, 4, generator=g)
        self.alias = self.embed  # a second name for the same module and weight
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.alias(x).mean(1))))


def test_fisher_of_a_subset_of_keys_beside_tied_weights_matches_per_sample_loop(caplog):
    """Keys that leave a tied weight out (finetune=lora on T5: the adapted maps only): the tied weight is frozen once,
    not under each of its names (functional_call refuses several values for tied names)."""
    model = _TiedClassifier().eval()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 5, (3, 6), generator=g), torch.randint(0, 5, (3,), generator=g)) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="fusion_bench.statistics.fisher"):
        got, n = diagonal_fisher(model, batches, None, target="label", keys=["mid.weight", "mid.bias"], chunk=2)
    assert "vmap failed" not in caplog.text
    assert model.head.weight is model.embed.weight  # still tied afterwards (torch.func unties it: _keeps_ties)
    assert all(p.requires_grad for p in model.parameters())
    want, _ = reference_fisher(model, batches, "label")
    assert n == 6 and set(got) == {"mid.weight", "mid.bias"}
    assert_fisher_close(got, {k: want[k] for k in got})
