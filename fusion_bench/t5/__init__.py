"""T5 / Flan-T5 on GLUE (text-to-text): local weights (model.py), GLUE data and metrics (glue.py), seq2seq
fine-tuning (train.py) and the model family (family.py) that the pipeline's stages take.

Selected by a model config with `family: t5` (fusion_bench.families.FAMILIES).
"""
