"""megatron_csd.models"""
