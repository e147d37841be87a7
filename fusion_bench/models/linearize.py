"""First-order (NTK) linearization of a module around its initial parameters, via `torch.func.jvp`.

    f_lin(x; theta) = f(x; theta_0) + J_theta f(x; theta_0) (theta - theta_0)

`LinearizedModel(module)` linearizes over the parameters of `module` that require grad (all of them for
`finetune=linear`, only the LoRA adapters for `finetune=l_lora`); the other parameters stay fixed at their
values. The trainable parameters keep *the module's own names* (the module's children are mounted on the
wrapper, not nested under a prefix), so a linearized encoder stores, and task vectors have, the same keys as
the plain encoder. theta_0 is kept as buffers of the child `linearization_point` (dots in names become `__`).

Two PyTorch kernels have no forward-mode AD (checked on torch 2.14): the fused
`torch._native_multi_head_attention` fast path that `nn.MultiheadAttention` takes in eval mode without grad,
and the flash / memory-efficient `scaled_dot_product_attention` kernels. The linearized forward therefore runs
inside `linearizable_attention()`, which turns the MHA fast path off and pins SDPA to its math backend (both
restored afterwards); the result is checked against finite differences in tests/test_modes.py.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

POINT = "linearization_point"


@contextlib.contextmanager
def linearizable_attention() -> Iterator[None]:
    """Attention kernels that support forward-mode AD: no fused MHA fast path, math SDPA."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")


class MountedModule(nn.Module):
    """Base for wrappers that keep `module`'s parameter names: its children, direct parameters and buffers are
    mounted on the wrapper (shared, not copied), and `module` itself is kept unregistered to call functionally."""

    def __init__(self, module: nn.Module):
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in module.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
        object.__setattr__(self, "_function_module", module)
        self._function_module.training = self.training = module.training

    def _constants(self) -> dict[str, torch.Tensor]:
        """The wrapper's current parameters and buffers (the shared module reads them through functional_call)."""
        state = dict(self.named_parameters())
        state.update((n, b) for n, b in self.named_buffers() if not n.startswith(POINT + "."))
        return state

    def train(self, mode: bool = True):
        super().train(mode)
        self._function_module.training = mode
        return self


class LinearizedModel(MountedModule):
    """`module` linearized in its trainable parameters around their current values (theta_0).

    `named_parameters()` of the wrapper equals `module.named_parameters()` (same names, same tensors): the
    trainable ones are theta, initialised at theta_0; the frozen ones are shared constants of the function.
    """

    def __init__(self, module: nn.Module):
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError(f"LinearizedModel: {type(module).__name__} has no parameter with requires_grad=True")
        if hasattr(module, POINT):
            raise ValueError(f"LinearizedModel: {type(module).__name__} already has an attribute {POINT!r}")
        super().__init__(module)
        self.linearized_names: tuple[str, ...] = tuple(names)
        point = nn.Module()
        params = dict(module.named_parameters())
        for n in names:
            point.register_buffer(_buffer_name(n), params[n].detach().clone())
        self.add_module(POINT, point)

    # ---- the function and its linearization ---------------------------------------------------------------
    def theta0(self) -> dict[str, torch.Tensor]:
        point = getattr(self, POINT)
        return {n: getattr(point, _buffer_name(n)) for n in self.linearized_names}

    def theta(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.linearized_names}

    def function(self, params: Mapping[str, torch.Tensor], *args, **kwargs):
        """f(x; params): the wrapped module with the linearized parameters replaced by `params`."""
        return functional_call(self._function_module, {**self._constants(), **params}, args, kwargs)

    def primal_and_tangent(self, *args, **kwargs):
        """(f(x; theta_0), J (theta - theta_0)) from one jvp: f_lin at theta_0 + c (theta - theta_0) is
        out + c * dout for every c (the coefficient search evaluates a whole grid from this one pass)."""
        theta0, theta = self.theta0(), self.theta()
        tangent = {n: theta[n] - theta0[n] for n in self.linearized_names}
        with linearizable_attention(), warnings.catch_warnings():
            # torch's forward-mode AD scripts its decompositions on first use: torch's own deprecation notice
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
            return jvp(lambda p: self.function(p, *args, **kwargs), (theta0,), (tangent,))

    def forward(self, *args, **kwargs):
        out, dout = self.primal_and_tangent(*args, **kwargs)
        return out + dout
