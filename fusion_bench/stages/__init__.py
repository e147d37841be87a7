"""The stages of a run, each a small module of plain functions over a model family (fusion_bench.families):

    finetune    -> checkpoint store (one fine-tune per task)
    statistics  -> per-task statistics next to each fine-tune (RegMean's Gram matrices, Fisher)
    merge       -> the configured merging method over theta_0 and the fine-tunes
    coefficients-> coefficients chosen on val (grid search, TALL lambdas) or learnt (AdaMerging, LoraHub)
    evaluate    -> reference and merged accuracies
    report      -> report.json / report.md

fusion_bench.pipeline.run calls them in that order; each reads only what an earlier one wrote.
"""
