"""`kernels`: run a loss test once with the chunked eager passes and once with the fused compiled
CPU kernels (megatron_csd.losses.compiled), whatever the input size."""
import pytest

from megatron_csd.losses import compiled


def use_kernels(kind: str) -> None:
    """In a spawned test process: "compiled" forces the compiled kernels, "chunked" the eager passes."""
    compiled.COMPILED_MIN_ELEMENTS = 0 if kind == "compiled" else 1 << 62


@pytest.fixture(params=["chunked", "compiled"])
def kernels(request, monkeypatch):
    monkeypatch.delenv(compiled.ENV_SWITCH, raising=False)
    monkeypatch.setattr(compiled, "COMPILED_MIN_ELEMENTS", 0 if request.param == "compiled" else 1 << 62)
    return request.param
