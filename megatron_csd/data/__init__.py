"""megatron_csd.data"""
