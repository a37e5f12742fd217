"""Shared fixtures: the demo model's real tokenizer (loaded once per session)."""

import pytest


@pytest.fixture(scope="session")
def demo_tokenizer():
    from lorafit.models import load_tokenizer

    return load_tokenizer("demo")
