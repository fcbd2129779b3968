"""megatron_csd.conversion"""
