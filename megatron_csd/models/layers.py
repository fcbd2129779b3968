"""Small HF-exact building blocks plugged into Megatron-Core's local layer spec.

- `HFNorm`: the normalisation of each family with HF's exact operation order, so fp32 logits
  match transformers to ~1e-7:
    gemma  y = (x32 * rsqrt(mean(x32^2) + eps) * (1 + w32)).to(x.dtype)   (zero-centred, w
           stored exactly as HF stores it: no +1 folded into the weight)
    llama  y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
    gpt2   y = layer_norm(x; w, b, eps)
  No communication; under sequence parallelism the weights are marked `sequence_parallel` so
  Megatron all-reduces their gradients over the TP group (as its own norms do).
- `gelu_tanh`: GPT-2's `gelu_new`, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written
  like transformers' NewGELUActivation.
- `scale_embedding_output`: multiplies Megatron's embedding output by sqrt(hidden) as Gemma
  does, with the factor rounded to the activation dtype first (HF: `hidden * tensor(sqrt(h),
  dtype=hidden.dtype)`); the (possibly tied) embedding weight itself is never scaled.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


class HFNorm(torch.nn.Module):
    """LayerNorm / RMSNorm / zero-centred RMSNorm with transformers' numerics.

    Built by Megatron's `build_module(spec, config=..., hidden_size=..., eps=...)`; the variant
    comes from `config.normalization` and `config.layernorm_zero_centered_gamma`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.normalization = config.normalization
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"HFNorm supports LayerNorm and RMSNorm, got {self.normalization!r}")
        self.eps = eps
        # Like Megatron's own layers: the default device under CPU initialisation (so a
        # `torch.device("meta")` context builds an empty model), else the current GPU.
        factory = dict(dtype=config.params_dtype)
        if not config.use_cpu_initialization:
            factory["device"] = torch.cuda.current_device()
        initial = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(initial(hidden_size, **factory))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, **factory))
                     if self.normalization == "LayerNorm" else None)
        for param in self.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "zero-centred RMSNorm" if self.zero_centered else self.normalization
        return f"{kind}, {tuple(self.weight.shape)}, eps={self.eps}"


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new, in transformers' operation order."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


gelu_pytorch_tanh = functools.partial(F.gelu, approximate="tanh")
gelu_pytorch_tanh.__name__ = "gelu_pytorch_tanh"


def _scale_hook(module, inputs, output, *, scale: float):
    return output * torch.tensor(scale, dtype=output.dtype, device=output.device)


def scale_embedding_output(embedding: torch.nn.Module, scale: float):
    """Register a forward hook multiplying `embedding`'s output by `scale` (activation dtype)."""
    return embedding.register_forward_hook(functools.partial(_scale_hook, scale=scale))
