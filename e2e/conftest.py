"""The tests' shared fixtures (the tiny model) for the e2e scenarios."""

from tests.conftest import pytest_collection_modifyitems, tiny_base, tiny_model_dir  # noqa: F401
