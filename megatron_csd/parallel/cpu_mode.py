"""Opt-in CPU (gloo) compatibility layer for Megatron-Core.

Megatron-Core hard-codes CUDA in a few places that matter for us: GPTModel's forward and the
pipeline schedules allocate with ``device=torch.cuda.current_device()`` or ``device="cuda"``,
all-gathers and p2p buffers call ``.cuda()``, Megatron DDP opens CUDA streams, and the RNG
tracker forks CUDA generator states. On a machine without CUDA this module makes those calls
land on the CPU instead, so TP/PP/DP runs work over the gloo backend (tests, the embedded
default example, debugging on a laptop):

- ``torch.cuda.current_device()`` returns ``"cpu"`` (a valid ``device=`` argument);
- ``torch.cuda.synchronize`` / ``empty_cache`` become no-ops;
- a global :class:`torch.overrides.TorchFunctionMode` rewrites every ``device=`` that names a
  CUDA device to ``cpu`` (factories, ``Tensor.to``) and makes ``Tensor.cuda()`` return ``self``;
- ``torch.cuda.current_stream/default_stream/Stream/stream/Event`` return inert stand-ins;
- RNG: :func:`seed_model_parallel_rng` seeds the CPU generator and installs Megatron's
  *inference* RNG tracker (its ``fork()`` is a no-op context), because the training tracker
  swaps CUDA generator states that do not exist here.

The layer is opt-in (:func:`enable_cpu_mode`) and refuses to switch on when CUDA is available,
so it can never silently move a GPU run to the CPU. Enabling it is idempotent and process-wide
(the function mode is pushed on the calling thread's mode stack; call it from the main thread
before building models).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_LOCK = threading.Lock()


def cpu_mode_enabled() -> bool:
    """True once :func:`enable_cpu_mode` has run in this process."""
    return _ENABLED


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device index means "that CUDA device" to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to cpu; ``Tensor.cuda()`` returns the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class _DummyStream:
    """Stand-in for ``torch.cuda.Stream``: every operation completes immediately on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DummyEvent:
    """Stand-in for ``torch.cuda.Event``; elapsed times are reported as 0."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _stream_context(stream=None):
    return contextlib.nullcontext(stream)


def enable_cpu_mode() -> None:
    """Patch ``torch.cuda`` entry points used by Megatron-Core so they run on the CPU.

    Idempotent. Raises RuntimeError when CUDA is available: the layer must never be active in
    a GPU run (pick the GPU path, or hide the GPUs with ``CUDA_VISIBLE_DEVICES=""``).
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "enable_cpu_mode() called on a machine where CUDA is available; the CPU "
                "compatibility layer is only for CUDA-less runs. Use the GPU path, or set "
                "CUDA_VISIBLE_DEVICES='' to force a CPU run.")
        cuda = torch.cuda
        cuda.current_device = lambda: "cpu"
        cuda.synchronize = lambda device=None: None
        cuda.empty_cache = lambda: None
        cuda.current_stream = lambda device=None: _DummyStream()
        cuda.default_stream = lambda device=None: _DummyStream()
        cuda.Stream = _DummyStream
        cuda.Event = _DummyEvent
        cuda.stream = _stream_context
        cuda.set_stream = lambda stream: None
        cuda.device_count = lambda: 0
        _CudaToCpuMode().__enter__()  # pushed for the life of the process (never popped)
        _ENABLED = True


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker for this rank.

    Call after ``parallel_state.initialize_model_parallel``. On CUDA this is Megatron's
    ``model_parallel_cuda_manual_seed(seed)`` (data-parallel seed ``seed``, tensor-parallel
    seed ``seed + 2718 + tp_rank``). In CPU mode the inference tracker is installed instead
    (its ``fork`` does not touch CUDA generators); the CPU generator gets ``seed``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=cpu_mode_enabled(), force_reset_rng=True)
