"""T5 / Flan-T5 on GLUE (text-to-text): local weights (model.py), GLUE data and metrics (glue.py), seq2seq
fine-tuning (train.py) and the finetune -> merge -> evaluate -> report loop (pipeline.py: `run_t5`).

Selected by a model config with `family: t5`; fusion_bench.pipeline.run dispatches to `run_t5`.
"""
