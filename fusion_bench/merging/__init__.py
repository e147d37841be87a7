"""Model merging over state dicts: plain functions, streaming tensor by tensor.

Every method takes ``(pretrained, finetuned, **hyperparameters)`` where the state dicts are
``Mapping[str, Tensor]`` (plain dicts or :class:`LazyStateDict` over safetensors files) and returns
the merged ``dict[str, Tensor]`` in the pretrained dtypes.  Arithmetic is fp32; integer / bool
buffers are copied from ``pretrained``.  Every method except :func:`weight_average` takes
``scaling_coef``.
"""

from .awd import AWDResult, awd_disentangle, awd_reference, awd_ta, awd_ties
from .dare import dare, dare_mask
from .lazy import LazyStateDict
from .task_arithmetic import task_arithmetic
from .task_vectors import derived_seed, kth_largest
from .ties import ties_merging
from .weight_average import weight_average

__all__ = [
    "AWDResult",
    "LazyStateDict",
    "awd_disentangle",
    "awd_reference",
    "awd_ta",
    "awd_ties",
    "dare",
    "dare_mask",
    "derived_seed",
    "kth_largest",
    "task_arithmetic",
    "ties_merging",
    "weight_average",
]
