"""Fixtures of the serving tests: each module defines its `agent`; the server around it is shared."""

from __future__ import annotations

import shutil

import pytest

from replica_agent.engine.data import stdlib_package_dir
from replica_agent.serving.background import BackgroundServer


@pytest.fixture(scope="module")
def json_data(tmp_path_factory):
    """A private copy of the standard library's json package as training data (feedback may write next to it)."""
    data = tmp_path_factory.mktemp("data") / "json"
    shutil.copytree(stdlib_package_dir("json"), data, ignore=shutil.ignore_patterns("__pycache__"))
    return data


@pytest.fixture(scope="module")
def server(agent):
    server = BackgroundServer(agent)
    yield server
    server.stop()
