"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

# A cold cache builds the tiny model inside the first test that needs it: about 45 s on 2 idle
# cores, but over 250 s was seen on a busy shared machine, past the default 300 s test timeout.
TINY_BUILD_TIMEOUT_S = 900


def pytest_collection_modifyitems(items):
    for item in items:
        if "tiny_model_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TINY_BUILD_TIMEOUT_S))


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The built-in tiny model's HF directory, from the user cache (built once, about 45 s, on first use)."""
    from replica_agent.engine.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    """The tiny model loaded by the model host: float32 on CPU, frozen. Share it; never modify it."""
    from replica_agent.engine.model_host import load_base_model

    return load_base_model("tiny")
