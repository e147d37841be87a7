"""Hyper-parameter searches over merges (hparams_search=optuna*): the search spaces and the best trial's
report."""
