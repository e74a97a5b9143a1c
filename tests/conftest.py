"""Shared test set-up.

The Triton kernels run on CPU through Triton's interpreter. ``TRITON_INTERPRET`` must be
set before ``triton.jit`` decorates them (at import), so it is set here, first.
Model-level tests may force the eager path with ``monkeypatch.setenv("SOTERIA_BACKEND", "eager")``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Fresh seed and a private cache directory for every test."""
    torch.manual_seed(0)
    monkeypatch.setenv("SOTERIA_CACHE_DIR", str(tmp_path / "soteria-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield
