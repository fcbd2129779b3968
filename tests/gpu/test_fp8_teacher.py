"""FP8 teacher vs bf16 teacher on a GPU with transformer-engine (skipped elsewhere).

The FP8 teacher must really run in FP8 (logits differ from bf16: Megatron would silently
ignore `fp8` without TE) while staying close: small KL between the two teacher distributions
and a CSD loss against a bf16 student within a few percent of the bf16-teacher loss.
"""
import tempfile

import pytest
import torch

pytestmark = pytest.mark.gpu


def _te_available():
    from megatron_csd.models import transformer_engine_available

    return transformer_engine_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", ["hybrid", "e4m3"])
def test_fp8_teacher_close_to_bf16_teacher(fp8):
    if not _te_available():
        pytest.skip("needs transformer-engine")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_csd.models import get_preset
    from megatron_csd.models.fp8_check import compare_fp8_teacher
    from megatron_csd.parallel.cpu_mode import seed_model_parallel_rng

    created = not dist.is_initialized()
    if created:
        torch.cuda.set_device(0)
        store = dist.FileStore(f"{tempfile.mkdtemp()}/store", 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        seed_model_parallel_rng(0)
        # A larger-than-tiny teacher (FP8 GEMMs want dims that are multiples of 16).
        teacher = get_preset("tiny-gemma").replace(hidden_size=256, ffn_hidden_size=1024,
                                                   num_attention_heads=8, num_query_groups=1,
                                                   kv_channels=32, num_layers=4)
        student = get_preset("tiny-gemma")
        result = compare_fp8_teacher(teacher, student, fp8=fp8, batch=4, seq_len=128)
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
    print(result)
    assert not result.logits_identical, "FP8 was not applied (logits bitwise equal to bf16)"
    assert result.mean_kl_bf16_fp8 < 1e-2
    assert result.relative_loss_diff < 0.05
