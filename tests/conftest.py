import os

import pytest

# Offline everywhere: nothing is fetched and nothing is cached in the home folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HOME", os.path.join(_ROOT, ".cache", "hf"))
os.environ.setdefault("SUPERWEIGHT_CACHE", os.path.join(_ROOT, ".cache", "superweight"))


@pytest.fixture(scope="session")
def default_model():
    """The real default catalog model, SmolLM2-135M (dequantized Q4_1 GGUF), loaded once."""
    from superweight.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Seed torch's global generator before every test, so tests that draw from it are
    reproducible and independent of the order they run in."""
    import torch

    torch.manual_seed(0)
