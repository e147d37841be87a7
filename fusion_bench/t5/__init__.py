"""T5 / Flan-T5 on GLUE (text-to-text): local weights (model.py), GLUE data and metrics (glue.py), seq2seq
fine-tuning (train.py) and T5Experiment (pipeline.py), which fusion_bench.pipeline.run drives.

Selected by a model config with `family: t5`; fusion_bench.pipeline.run then uses T5Experiment.
"""
