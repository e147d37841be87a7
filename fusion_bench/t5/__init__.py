"""T5 / Flan-T5 on GLUE (text-to-text) as one model family: local weights (model.py), its fine-tuning modes
(modes.py), seq2seq fine-tuning (train.py) and the family (family.py) that the pipeline's stages take; GLUE's data
and metrics are data (fusion_bench/data/glue.py).

Selected by a model config with `family: t5` (fusion_bench.families.FAMILIES).
"""
