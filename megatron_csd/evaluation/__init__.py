"""megatron_csd.evaluation"""
