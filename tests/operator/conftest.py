"""Fixtures of the operator tests."""

from __future__ import annotations

import pytest
from kubernetes import config

from collm_operator.kube import Kube
from e2e.devcluster.cluster import DevCluster


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    """The operator's Kube against the stateful API emulator (with the CRDs; no kubelet, no operator)."""
    dc = DevCluster(workdir=tmp_path_factory.mktemp("devcluster"), kubelet=False, operator=False)
    dc.start()
    try:
        yield Kube(config.new_client_from_config(str(dc.kubeconfig)))
    finally:
        dc.stop()
