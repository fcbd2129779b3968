"""FP8 teacher vs bf16 teacher: how much does running the teacher in FP8 change what the student
is distilled towards?

Both teachers are built with the transformer-engine layer spec and hold identical weights;
only the FP8 one has `fp8` set in its own TransformerConfig, so Megatron runs its transformer
block under TE's fp8_autocast (the embedding and output layer stay in bf16). We compare, on the
same token ids:
- max |logit difference| and mean KL(p_bf16 || p_fp8) over the real vocabulary (float64);
- the CSD loss of a bf16 student against each teacher (megatron_csd.losses, mean over tokens).
`logits_identical` must be False: identical logits would mean FP8 was silently not applied.
Needs CUDA and transformer-engine; call after torch.distributed and parallel_state (TP = 1 is
enough) are initialised.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megatron_csd.models.builder import build_gpt_model, freeze_teacher
from megatron_csd.models.checkpoint import load_model
from megatron_csd.models.config import ModelConfig


class Fp8TeacherComparison(NamedTuple):
    max_abs_logit_diff: float
    max_abs_logit: float
    mean_kl_bf16_fp8: float
    csd_loss_bf16_teacher: float
    csd_loss_fp8_teacher: float
    relative_loss_diff: float
    logits_identical: bool


def compare_fp8_teacher(teacher_cfg: ModelConfig, student_cfg: ModelConfig, *, fp8: str = "hybrid",
                        fp8_recipe: str = "delayed", teacher_dir: Optional[str] = None,
                        student_dir: Optional[str] = None, batch: int = 4, seq_len: int = 128,
                        seed: int = 0, warmup_forwards: int = 3) -> Fp8TeacherComparison:
    from megatron_csd.losses import LossConfig, distillation_loss

    if teacher_cfg.padded_vocab_size != student_cfg.padded_vocab_size:
        raise ValueError("teacher and student must share the padded vocabulary")
    if not torch.cuda.is_available():
        raise ValueError("the FP8 teacher comparison needs a CUDA GPU")
    torch.manual_seed(seed)
    teacher_bf16 = build_gpt_model(teacher_cfg, params_dtype=torch.bfloat16, use_te=True)
    teacher_fp8 = build_gpt_model(teacher_cfg, params_dtype=torch.bfloat16, fp8=fp8,
                                  fp8_recipe=fp8_recipe, perform_initialization=False)
    student = build_gpt_model(student_cfg, params_dtype=torch.bfloat16, use_te=True)
    if teacher_dir is not None:
        load_model(teacher_bf16, teacher_dir)
    if student_dir is not None:
        load_model(student, student_dir)
    # Same weights in both teachers (the FP8 metadata in TE's _extra_state is per model).
    weights = {k: v for k, v in teacher_bf16.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = teacher_fp8.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    for teacher in (teacher_bf16, teacher_fp8, student):
        freeze_teacher(teacher)

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, teacher_cfg.vocab_size, (batch, seq_len), generator=generator).cuda()
    positions = torch.arange(seq_len, device="cuda").unsqueeze(0).expand(batch, seq_len)
    with torch.no_grad():
        for _ in range(warmup_forwards):  # delayed scaling needs amax history before it is accurate
            teacher_fp8(tokens, positions, None)
        logits_bf16 = teacher_bf16(tokens, positions, None)
        logits_fp8 = teacher_fp8(tokens, positions, None)
        logits_student = student(tokens, positions, None)
    vocab = teacher_cfg.vocab_size
    ref = logits_bf16[..., :vocab].double()
    got = logits_fp8[..., :vocab].double()
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    loss_config = LossConfig(objective="csd")
    losses = [float(distillation_loss(logits_student.float(), teacher.float(), loss_config,
                                      vocab_size=vocab).mean())
              for teacher in (logits_bf16, logits_fp8)]
    return Fp8TeacherComparison(
        max_abs_logit_diff=float((ref - got).abs().max()), max_abs_logit=float(ref.abs().max()),
        mean_kl_bf16_fp8=kl, csd_loss_bf16_teacher=losses[0], csd_loss_fp8_teacher=losses[1],
        relative_loss_diff=abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12),
        logits_identical=bool(torch.equal(logits_bf16, logits_fp8)))
