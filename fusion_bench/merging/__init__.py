"""Model merging over state dicts: plain functions, streaming tensor by tensor.

Every method takes ``(pretrained, finetuned, **hyperparameters)`` where the state dicts are
``Mapping[str, Tensor]`` (plain dicts or :class:`LazyStateDict` over safetensors files) and returns
the merged ``dict[str, Tensor]`` in the pretrained dtypes.  Arithmetic is fp32; integer / bool
buffers are copied from ``pretrained``.  Every method except :func:`weight_average`,
:func:`model_stock`, :func:`tall_masks` and :func:`emr_merging` takes ``scaling_coef``.
Task-specific methods (:func:`tall_masks`, :func:`emr_merging`) return a :class:`TaskSpecificMerge`
(shared vector + per-task masks and rescalers) that gives each task's weights.
Statistics-based methods (:func:`regmean`, :func:`fisher_merging`) also take one statistic per task
(Gram matrices, diagonal Fishers: fusion_bench.statistics) and no ``scaling_coef``. Coefficient learning
(fusion_bench.merging.adamerging, fusion_bench.merging.adarank, fusion_bench.merging.lorahub) learns the coefficients
of a weighted merge (AdaRank: also masks over the task vectors' singular components).

Every method is declared where it is defined (``@merging_method``) in one table, ``METHODS`` (name of its
conf/method/*.yaml -> :class:`~fusion_bench.merging.registry.MethodSpec`: kind, affine in scaling_coef, modes,
...): fusion_bench/merging/registry.py, whose doc says how to add a method.
"""

from .awd import AWDResult, awd_disentangle, awd_reference, awd_ta, awd_ties
from .breadcrumbs import breadcrumbs
from .consensus import consensus_merging, tall_mask_lambda_grid, tall_masks
from .dare import dare, dare_mask
from .emr import emr_merging
from .fisher_merging import fisher_merging
from .iso import iso_c, iso_cts
from .lazy import LazyStateDict
from .magmax import magmax
from .model_stock import model_stock
from .registry import MethodSpec, merging_method
from .regmean import regmean
from .task_arithmetic import task_arithmetic
from .task_specific import TaskSpecificMerge
from .task_vectors import derived_seed, kth_largest
from .ties import ties_merging
from .tsv import tsv_merging
from .weight_average import weight_average
from .wudi import wudi_merging

__all__ = [
    "METHODS",
    "AWDResult",
    "LazyStateDict",
    "MethodSpec",
    "TaskSpecificMerge",
    "awd_disentangle",
    "awd_reference",
    "awd_ta",
    "awd_ties",
    "breadcrumbs",
    "consensus_merging",
    "dare",
    "dare_mask",
    "derived_seed",
    "emr_merging",
    "fisher_merging",
    "iso_c",
    "iso_cts",
    "kth_largest",
    "magmax",
    "merging_method",
    "model_stock",
    "regmean",
    "tall_mask_lambda_grid",
    "tall_masks",
    "task_arithmetic",
    "ties_merging",
    "tsv_merging",
    "weight_average",
    "wudi_merging",
]


def __getattr__(name: str):
    if name == "METHODS":  # the table, complete once every module of the package has declared its methods
        from .registry import methods

        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
