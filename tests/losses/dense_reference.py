"""Dense fp64 references for every objective, written independently of megatron_csd.losses.

CSD is the literal O(V^2) double sum over vocabulary pairs; the KL family uses log_softmax and
the textbook formulas; gradients come from autograd. Masking semantics (csd-math.md): columns at
or past `vocab_size`, and columns that are -inf in either input, are removed before anything is
computed; a row with no remaining column has loss 0 and gradient 0.
"""
from __future__ import annotations

import torch

from megatron_csd.losses import LossConfig


def _keep(student, teacher, vocab_size):
    keep = torch.isfinite(student) | (student == float("inf"))
    keep = (student != float("-inf")) & (teacher != float("-inf"))
    if vocab_size is not None:
        keep[..., vocab_size:] = False
    return keep


def _masked_softmax(logits, keep):
    filled = torch.where(keep, logits, torch.tensor(float("-inf"), dtype=logits.dtype))
    probs = torch.softmax(filled, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def _masked_log_softmax(logits, keep):
    filled = torch.where(keep, logits, torch.tensor(float("-inf"), dtype=logits.dtype))
    return torch.log_softmax(filled, dim=-1)


def _csd_row(zs, zt, keep, cfg):
    zs, zt = zs[keep], zt[keep]
    if zs.numel() == 0:
        return zs.sum() * 0.0
    tau = cfg.temperature
    q = torch.softmax(zs.detach() / tau, -1)
    p = torch.softmax(zt.detach() / tau, -1)
    uniform = torch.full_like(q, 1.0 / q.numel())
    factors = {"S": q, "T": p, "U": uniform, "M": cfg.mix * p + (1 - cfg.mix) * q}
    w1, w2 = factors[cfg.weights[0]], factors[cfg.weights[1]]
    d = zs - zt
    pair = (d.unsqueeze(0) - d.unsqueeze(1)) ** 2  # [y, x] = (d[x] - d[y])^2
    return cfg.scale * 0.5 * (w1.unsqueeze(1) * w2.unsqueeze(0) * pair).sum()


def _kl_row(zs, zt, keep, cfg):
    zs, zt = zs[keep], zt[keep]
    if zs.numel() == 0:
        return zs.sum() * 0.0
    tau = cfg.temperature
    log_q = torch.log_softmax(zs / tau, -1)
    log_p = torch.log_softmax(zt / tau, -1)
    q, p = log_q.exp(), log_p.exp()

    def kl(log_a, log_b):
        return (log_a.exp() * (log_a - log_b)).sum()

    name = cfg.objective
    if name == "fkl":
        return kl(log_p, log_q)
    if name == "rkl":
        return kl(log_q, log_p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "jsd":
        log_m = torch.log(cfg.beta * p + (1 - cfg.beta) * q)
        return cfg.beta * kl(log_p, log_m) + (1 - cfg.beta) * kl(log_q, log_m)
    if name == "skl":
        return kl(log_p, torch.log(cfg.skew * p + (1 - cfg.skew) * q))
    if name == "srkl":
        return kl(log_q, torch.log(cfg.skew * q + (1 - cfg.skew) * p))
    if name == "dld":
        return cfg.scale * 0.5 * ((zs - zt) ** 2).mean()
    raise AssertionError(name)


def dense_loss(student, teacher, cfg: LossConfig, vocab_size=None):
    """Per-token loss [...] in fp64 (differentiable w.r.t. `student`)."""
    zs, zt = student.double(), teacher.double()
    keep = _keep(zs, zt, vocab_size)
    row = _csd_row if cfg.objective == "csd" else _kl_row
    flat = [row(a, b, k, cfg) for a, b, k in zip(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]),
                                                 keep.reshape(-1, keep.shape[-1]))]
    return torch.stack(flat).view(zs.shape[:-1])


def dense_loss_and_grad(student, teacher, cfg, vocab_size=None, grad_weights=None):
    """(loss fp64, d(sum(grad_weights * loss))/d student fp64)."""
    leaf = student.detach().double().requires_grad_(True)
    loss = dense_loss(leaf, teacher.detach(), cfg, vocab_size)
    weights = torch.ones_like(loss) if grad_weights is None else grad_weights.double()
    (grad,) = torch.autograd.grad((loss * weights).sum(), leaf)
    grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    return loss.detach(), grad
