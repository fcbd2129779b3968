"""megatron_csd: Concrete Score Distillation (and baseline objectives) on Megatron-Core."""

__version__ = "0.1.0"
