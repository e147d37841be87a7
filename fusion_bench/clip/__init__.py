"""CLIP (open_clip image towers: ViT-B/32, ViT-B/16, ViT-L/14 and the tiny CLIP) as one model family: the family
(family.py), loading and zero-shot heads (model.py), its LightningModule and fine-tune (train.py), fine-tunes handed
in with finetuned_from (imported.py, hf_import.py), its output formats (export.py, hf_export.py) and the tiny CLIP's
pretraining (tiny_pretrain.py, configs/).

Selected by a model config with `family: clip` (the default; fusion_bench.families.FAMILIES).
"""
