"""The opt-in CPU compatibility layer (megatron_csd.parallel.cpu_mode).

Enabling it is process-wide, so every check runs in a spawned process (tests.spawn), never in
the pytest process itself.
"""
import pytest
import torch

from tests.spawn import run_distributed


def _cpu_mode_body(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_csd.parallel import cpu_mode

    assert not cpu_mode.cpu_mode_enabled()
    # Refuses to switch on where CUDA is available (and patches nothing when it refuses).
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        with pytest.raises(RuntimeError, match="CUDA is available"):
            cpu_mode.enable_cpu_mode()
    finally:
        torch.cuda.is_available = real_is_available
    assert not cpu_mode.cpu_mode_enabled()
    assert torch.cuda.synchronize is not None

    cpu_mode.enable_cpu_mode()
    cpu_mode.enable_cpu_mode()  # idempotent
    assert cpu_mode.cpu_mode_enabled()

    # Allocation with CUDA devices lands on the CPU; .cuda() / .to("cuda") are identities.
    for device in ("cuda", torch.device("cuda"), "cuda:0", 0, torch.cuda.current_device()):
        assert torch.empty(3, device=device).device.type == "cpu"
    x = torch.arange(4.0)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda", dtype=torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.current_stream().wait_stream(stream)
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.elapsed_time(event) == 0.0

    # Megatron collectives that allocate on torch.cuda.current_device() work over gloo.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        cpu_mode.seed_model_parallel_rng(1234)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(2)
        local = torch.full((2, 3), float(rank))
        gathered = tensor_parallel.gather_from_tensor_model_parallel_region(local)
        expected = torch.cat([torch.full((2, 3), float(r)) for r in range(world_size)], dim=-1)
        torch.testing.assert_close(gathered, expected)
        # Same seed -> same CPU stream on every rank (needed for use_cpu_initialization).
        cpu_mode.seed_model_parallel_rng(7)
        draw = torch.rand(5)
        draws = [torch.empty(5) for _ in range(world_size)]
        dist.all_gather(draws, draw)
        assert all(torch.equal(d, draws[0]) for d in draws)
        with pytest.raises(TypeError, match="seed"):
            cpu_mode.seed_model_parallel_rng(1.5)
    finally:
        parallel_state.destroy_model_parallel()


def test_cpu_mode_patches_cuda_calls_and_runs_megatron_collectives():
    run_distributed(_cpu_mode_body, 2)
