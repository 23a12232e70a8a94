"""Settings every test shares."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub, which reads it once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    """No hub access (everything runs on our own assets), and one intra-op thread.

    The test models are tiny: they gain nothing from threads, and on a busy 2-core machine OpenMP
    workers waiting for a core make a tiny UNet's step take seconds instead of milliseconds.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
