"""CPU-mode companions for Megatron's optimizers: gradient clipping, and the distributed optimizer.

Megatron-Core's ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() ==
'torch.cuda.FloatTensor'`` before scaling, so ``clip_grad > 0`` fails on a CPU run even though
the grad-norm computation itself (``get_grad_norm_fp32``) works there. In CPU mode we replace
the reference that ``megatron.core.optimizer.optimizer`` uses with the same math:

    clip_coeff = max_norm / (total_norm + 1e-6);  if clip_coeff < 1: g *= clip_coeff  (fp32, in place)

which is what Megatron's fallback ``multi_tensor_scale`` computes element-wise. The norm is
still Megatron's (model-parallel reduced, shared / TP-duplicated parameters counted once).
Megatron's DistributedOptimizer (the GPU default) sorts parameters by ``param.type()`` and
accepts only ``'torch.cuda.FloatTensor'`` / ``'torch.cuda.BFloat16Tensor'`` / ...;
``enable_cpu_distributed_optimizer`` makes a bare ``Tensor.type()`` call on a CPU tensor report
the CUDA type name (consistent with the CPU layer, where ``torch.cuda.current_device()`` is
``"cpu"``), so the GPU optimizer path -- and its checkpoint format -- runs and is tested on CPU.
Both are only active together with ``enable_cpu_mode``; they refuse to install when CUDA is
available.
"""
from __future__ import annotations

import torch

from megatron_csd.parallel.cpu_mode import cpu_mode_enabled

_INSTALLED = False
_TYPE_PATCHED = False


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            if grad.dtype != torch.float32:
                raise TypeError(f"gradient clipping expects fp32 main gradients, got {grad.dtype}")
            grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.mul_(clip_coeff)


def enable_cpu_grad_clipping() -> None:
    """Install the CPU clipping routine into Megatron's optimizer module (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available() or not cpu_mode_enabled():
        raise RuntimeError("enable_cpu_grad_clipping() is for CPU mode only (call enable_cpu_mode first)")
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
    _INSTALLED = True


def enable_cpu_distributed_optimizer() -> None:
    """Let Megatron's DistributedOptimizer accept CPU parameters (idempotent, CPU mode only)."""
    global _TYPE_PATCHED
    if _TYPE_PATCHED:
        return
    if torch.cuda.is_available() or not cpu_mode_enabled():
        raise RuntimeError("enable_cpu_distributed_optimizer() is for CPU mode only")
    original_type = torch.Tensor.type

    def type_as_if_on_cuda(self, *args, **kwargs):
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    torch.Tensor.type = type_as_if_on_cuda
    _TYPE_PATCHED = True
