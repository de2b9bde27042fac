import os

import torch
from hypothesis import HealthCheck, settings

# Deterministic, bounded property runs; CI gets the same examples every time.
settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("FXQUANT_HYPOTHESIS", "default"))
torch.set_num_threads(2)
