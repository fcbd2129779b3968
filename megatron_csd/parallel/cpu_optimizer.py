"""CPU-mode companion for Megatron's optimizer: gradient clipping without the CUDA type check.

Megatron-Core's ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() ==
'torch.cuda.FloatTensor'`` before scaling, so ``clip_grad > 0`` fails on a CPU run even though
the grad-norm computation itself (``get_grad_norm_fp32``) works there. In CPU mode we replace
the reference that ``megatron.core.optimizer.optimizer`` uses with the same math:

    clip_coeff = max_norm / (total_norm + 1e-6);  if clip_coeff < 1: g *= clip_coeff  (fp32, in place)

which is what Megatron's fallback ``multi_tensor_scale`` computes element-wise. The norm is
still Megatron's (model-parallel reduced, shared / TP-duplicated parameters counted once).
Only active together with ``enable_cpu_mode``; refuses to install when CUDA is available.
"""
from __future__ import annotations

import torch

from megatron_csd.parallel.cpu_mode import cpu_mode_enabled

_INSTALLED = False


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
