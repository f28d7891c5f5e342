import builtins
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")


@pytest.fixture
def hide_bitsandbytes(monkeypatch):
    """Call it to make every later import of bitsandbytes fail, as on a machine without the qlora extra."""
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    return lambda: monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)


@pytest.fixture
def dora_route(monkeypatch):
    """Call it with "sparse" or "gemm" to force how DoRA with dropout computes W drop(x) (lora.lowrank): from
    W x and the dropped elements at any size and rate, or with a second frozen GEMM."""
    import lora.lowrank as lowrank

    def use(route: str) -> None:
        if route not in ("sparse", "gemm"):
            raise ValueError(f"route must be 'sparse' or 'gemm', got {route!r}")
        sparse = route == "sparse"
        monkeypatch.setattr(lowrank, "SPARSE_DROPPED_PRODUCT_MIN_ROWS", 0 if sparse else 1 << 62)
        monkeypatch.setattr(lowrank, "SPARSE_DROPPED_PRODUCT_MAX_P", 1.0 if sparse else 0.0)

    return use
