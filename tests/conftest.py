import contextlib
import ctypes
import gc
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic, bounded property runs; CI gets the same examples every time.
settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("FXQUANT_HYPOTHESIS", "default"))
torch.set_num_threads(2)
if not torch.cuda.is_available():
    # fxquant's Triton kernels (the CUDA kernels of its ops) run on the CPU under Triton's interpreter, so CI tests
    # the very kernels a GPU runs. Set before anything imports them: triton.jit reads it when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _release_memory_after_slow_tests(request):
    """The slow suite prepares ~100 large models in one process; without handing freed memory back to the OS
    its resident size grew to 20 GB and the OOM killer stopped it. Collect, then trim glibc's heap."""
    yield
    if request.node.get_closest_marker("slow") is None:
        return
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
