"""megatron_csd.parallel"""
