"""The ranges of the run-level options (conf/config.yaml and the model, taskpool, finetune, trainer, analysis and
hparams_search groups), by dotted path. An option absent from the run's config (T5's max_source_length in a CLIP
run, analysis.* without analysis=...) is not checked. A merging method's settings are declared with the method
(fusion_bench/merging/*.py, `<function>.ranges`), the statistics and coefficient strategies' blocks in the stages
that read them. tests/test_validation_ranges.py fails for a numeric option of conf/ that no range covers.
"""

from __future__ import annotations

from fusion_bench.validation.ranges import (
    ANY_NUMBER,
    COUNT,
    FLAG,
    ONE_COEF,
    SEED,
    TORCH_SEED,
    Coefficient,
    ListOf,
    Maybe,
    Number,
    Pattern,
    Range,
    TaskNames,
    any_of,
    choice,
    fraction,
    integer,
    non_negative,
    positive,
)

STAGES = ("finetune", "merge", "evaluate", "all", "analyze")
SPLITS = ("train", "val", "test")

RUN_OPTIONS: dict[str, Range] = {
    # conf/config.yaml
    "stage": choice(*STAGES),
    "seed": SEED,
    "num_threads": COUNT,
    "output.adapters": FLAG,
    # taskpool=
    "taskpool.tasks": TaskNames(),
    "taskpool.version": integer(0, note="the tiny generators' version"),
    "taskpool.val_fraction": fraction(low_open=True, high_open=True, note="the share of train carved out as val"),
    "taskpool.max_val": COUNT,
    "taskpool.split_seed": TORCH_SEED,
    "taskpool.num_workers": integer(0, note="DataLoader worker processes"),
    "taskpool.train_augment": FLAG,
    "taskpool.cache_eval": FLAG,
    # model=
    "model.eval_batch_size": COUNT,
    "model.max_source_length": COUNT,
    "model.max_target_length": COUNT,
    "model.max_new_tokens": COUNT,
    "model.download": FLAG,
    "model.train.lr": positive("the learning rate"),
    "model.train.weight_decay": non_negative(),
    "model.train.batch_size": COUNT,
    "model.train.steps": integer(1, note="optimizer steps of each fine-tune"),
    "model.train.warmup_steps": integer(0),
    "model.train.checkpoint_every": integer(1, note="steps between resumable checkpoints"),
    # finetune=
    "finetune.r": integer(1, note="LoRA rank"),
    "finetune.alpha": positive("LoRA scales its update by alpha / r"),
    "finetune.dropout": Number(0, 0, note="LoRA on attention is applied as merged weights: there is no input to drop"),
    "finetune.init": choice("zero_b", "compensated"),
    "finetune.init_seed": TORCH_SEED,
    "finetune.task_vector": choice("delta_w", "adapters"),
    "finetune.train_head": FLAG,
    "finetune.train_bias": FLAG,
    "finetune.posthoc": FLAG,
    "finetune.workers": any_of(COUNT, choice("auto")),
    "finetune.evaluate": choice("folded", "linearized"),
    # trainer=
    "trainer.devices": any_of(COUNT, choice(-1, "auto"), ListOf(integer(0), min_len=1),
                              Pattern(r"-1|\d+(\s*,\s*\d+)*,?", "a string of device indices such as '0,1'")),
    "trainer.log_every_n_steps": COUNT,
    "trainer.deterministic": Maybe(any_of(FLAG, choice("warn"))),
    # analysis=
    "analysis.grid_points": COUNT,
    "analysis.low": ANY_NUMBER,
    "analysis.high": ANY_NUMBER,
    "analysis.keep": fraction(low_open=True, note="the share of the control task's pretrained accuracy to keep"),
    "analysis.max_subsets": COUNT,
    "analysis.scaling_coef": ONE_COEF,
    "analysis.split": choice(*SPLITS),
    # hparams_search=optuna_task_coefs
    "task_coefs_space.low": ANY_NUMBER,
    "task_coefs_space.high": ANY_NUMBER,
}

ORDERED_PAIRS = (("analysis.low", "analysis.high", "<"), ("task_coefs_space.low", "task_coefs_space.high", "<="))

# The settings of each coefficient strategy's block (`coefficients=...` or a method's own `coefficients:`; the
# strategies are in fusion_bench/stages/coefficients/learn.py)
STRATEGY_RANGES: dict[str, dict[str, Range]] = {
    "grid": {},
    "adamerging": {
        "layer_wise": FLAG,
        "steps": integer(0, note="Adam steps; 0 keeps the initial coefficients"),
        "lr": positive("Adam's learning rate"),
        "batch_size": COUNT,
        "batches_per_task": COUNT,
        "init": fraction(note="the coefficients' start, inside the clamp box [0, 1]"),
        "clamp_in_forward": FLAG,
        "split": choice("train", "val", "test"),
        "seed": TORCH_SEED,
    },
    "adarank": {  # fusion_bench/merging/adarank.py; defaults: the official ViT-B/32 8-task run
        "steps": integer(0, note="Adam steps; 0 keeps the start: the base merge"),
        "lr": positive("Adam's learning rate"),
        "batch_size": COUNT,
        "batches_per_task": COUNT,
        "init": Maybe(Coefficient(per_task=True, search=False, note="lambda's start; null: method.scaling_coef")),
        "initial_rank_ratio": Maybe(fraction(note="the share of each masked key's components kept at the start; "
                                                  "null: CART's rank_ratio, or 1 over task arithmetic")),
        "mask_temp": positive("the mask is sigmoid(logit / mask_temp)"),
        "mask_init": positive("|the mask logits' start|: + kept, - dropped"),
        "learn_coefs": FLAG,
        "keys": choice("official", "all_2d"),
        "split": choice(*SPLITS),
        "seed": TORCH_SEED,
    },
    "lorahub": {
        "budget": integer(1, note="evaluations of the objective"),
        "bound": positive("weights are searched in [-bound, bound]"),
        "l1": non_negative(),
        "examples_per_task": COUNT,
        "seed": SEED,
    },
}

# method.svc (post=svc; fusion_bench/merging/svc.py): alpha is a positive floor or "1/T"
SVC_RANGES: dict[str, Range] = {
    "alpha": any_of(positive("the calibration floor of s (the official run.sh: 1/T; 1.0 after TSV-M)"), choice("1/T")),
    "keys": choice("official", "all_2d"),
}

# method.statistics (fusion_bench/stages/statistics.py)
STATISTICS_RANGES: dict[str, Range] = {
    "kind": choice("gram", "fisher", "layer_gram"),  # layer_gram: RegMean++'s, of the partial merge
    "num_samples": integer(1, note="train examples per task"),
    "batch_size": COUNT,
    "seed": TORCH_SEED,
    "target": choice("sample", "label", "expected"),  # what a family offers: ModelFamily.fisher_targets
    "norm_scales": FLAG,  # kind gram: also each norm scale's mean of x_hat^2 (LOT Merging)
}
