"""How often bf16 evaluation changes a prediction, against fp32, on a real-size ViT-B/32 with a 397-class head.

    python -m fusion_bench.benchmarks.precision [--images 256] [--classes 397]

A randomly initialised open_clip ViT-B/32 (nothing is downloaded) on seeded random 224 px images, and a head of
random unit rows at CLIP's logit scale (100). Three evaluations of the same weights:
- fp32: everything in fp32 (the reference);
- bf16 logits: the encoder under bf16 autocast and the head product in bf16 too (fusion_bench before the fix);
- bf16 encoder, fp32 logits: the encoder under bf16 autocast, normalisation and head product in fp32 (now).
Prints the argmax agreement of each with fp32. Runs on the GPU when there is one (autocast on its device),
else on the CPU (CPU bf16 kernels round like the GPU's but are slow). Not a test.
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--classes", type=int, default=397)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    import open_clip

    from fusion_bench.models.heads import head_logits

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    enc = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).visual.eval().to(device)
    g = torch.Generator().manual_seed(1)
    head = 100 * torch.nn.functional.normalize(torch.randn(args.classes, enc.output_dim, generator=g), dim=-1)
    head = head.to(device)
    preds = {"fp32": [], "bf16 logits": [], "bf16 encoder, fp32 logits": []}
    for i in range(0, args.images, args.batch_size):
        x = torch.randn(min(args.batch_size, args.images - i), 3, 224, 224, generator=g).to(device)
        preds["fp32"].append(head_logits(enc(x), head).argmax(-1))
        with torch.autocast(device, dtype=torch.bfloat16):
            f = enc(x)
            old = (f / f.norm(dim=-1, keepdim=True)) @ head.T  # bf16 under autocast
            preds["bf16 logits"].append(old.argmax(-1))
            preds["bf16 encoder, fp32 logits"].append(head_logits(f, head).argmax(-1))
    ref = torch.cat(preds["fp32"])
    out = {"device": device, "images": args.images, "classes": args.classes,
           "agreement_with_fp32": {k: float((torch.cat(v) == ref).float().mean()) for k, v in preds.items()
                                   if k != "fp32"}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
