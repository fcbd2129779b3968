"""Vocab-parallel distillation objectives: Concrete Score Distillation and baselines.

    from megatron_csd.losses import LossConfig, distillation_loss
    per_token = distillation_loss(student_logits, teacher_logits, LossConfig("csd", weights="SS"),
                                  tp_group=tp_group, vocab_size=real_vocab_size)

Pure torch + torch.distributed; never imports megatron.
"""
from .api import distillation_loss
from .config import CSD_WEIGHTS, OBJECTIVES, LossConfig

__all__ = ["LossConfig", "distillation_loss", "OBJECTIVES", "CSD_WEIGHTS"]
