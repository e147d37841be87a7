"""The zero-shot head against a hand computation, on the tiny CLIP's architecture."""

import math

import open_clip
import torch

from fusion_bench.clip.model import ImageClassifier, create_clip, zero_shot_head


def test_head_matches_hand_computation():
    torch.manual_seed(0)
    model = create_clip("tiny-clip").eval()
    tok = open_clip.get_tokenizer("tiny-clip")
    classnames, templates = ["cat", "dog", "red circle"], ["a photo of a {}.", "a {}."]
    head = zero_shot_head(model, tok, classnames, templates)

    scale = math.exp(model.logit_scale.item())
    expected = []
    for c in classnames:
        vecs = []
        for t in templates:  # one prompt at a time, normalised by hand
            v = model.encode_text(tok([t.format(c)]))[0].double()
            vecs.append(v / math.sqrt(float((v * v).sum())))
        m = sum(vecs) / len(vecs)
        expected.append(scale * m / math.sqrt(float((m * m).sum())))
    torch.testing.assert_close(head.double(), torch.stack(expected), rtol=1e-4, atol=1e-4)
    assert head.shape == (3, 64)

    x = torch.randn(4, 3, 32, 32)
    logits = ImageClassifier(model.visual, head)(x)
    f = model.encode_image(x).double()
    f = f / f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(logits.double(), f @ torch.stack(expected).T, rtol=1e-4, atol=1e-4)
