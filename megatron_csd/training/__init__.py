"""megatron_csd.training"""
