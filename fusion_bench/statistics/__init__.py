"""Statistics of a model on data, computed once per fine-tune and passed to the merges that need them.

:func:`input_grams` (RegMean: input Gram matrix of every linear map) and :func:`diagonal_fisher`
(Fisher merging: mean squared per-sample gradient of the log-likelihood).  Plain functions of a model
and an iterable of batches; the model family supplies the forward / log-likelihood.
"""

from .attention import mha_out_proj_input
from .fisher import classifier_log_likelihood, classifier_sample, diagonal_fisher
from .grams import input_grams

__all__ = [
    "classifier_log_likelihood",
    "classifier_sample",
    "diagonal_fisher",
    "input_grams",
    "mha_out_proj_input",
]
