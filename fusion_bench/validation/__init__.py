"""The validation pass: every option of the resolved config checked (type and range) before any work.

- ranges.py: what a value must be (Number, Choice, Flag, Coefficient, ...); imports nothing of the project, so the
  merging methods declare their settings' ranges with it (`<method function>.ranges`).
- options.py: the run-level options' ranges (model.train, taskpool, trainer, analysis, ...).
- check.py: `validate_config(cfg)`, the pass itself (run-level options, the method's declared settings, the
  statistics and coefficient strategy blocks, then the model family's own checks); pipeline.run calls it first.

Nothing is imported here: the merging modules import ranges.py, and check.py imports them back.
"""
