"""Kube.apply against the stateful API emulator: it creates, patches, and leaves alone what it does not own."""

from __future__ import annotations

import pytest

from collm_operator.kube import NotOwned, foreign_holder

OWNER = {"apiVersion": "collm.io/v1alpha1", "kind": "CollmCluster", "name": "tiny", "uid": "uid-1", "controller": True}


def configmap(data: dict, owner: dict | None = OWNER) -> dict:
    meta: dict = {"name": "tiny-config", "namespace": "default"}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def test_apply_creates_patches_and_refuses_an_object_another_owner_holds(kube):
    """`apply` once patched a same-named object it did not own."""
    assert kube.apply(configmap({"a": "1"})) is True
    assert kube.apply(configmap({"a": "1"})) is False
    assert kube.apply(configmap({"a": "2"})) is True
    other = {**OWNER, "name": "other", "uid": "uid-2"}
    with pytest.raises(NotOwned, match="belongs to CollmCluster tiny \\(uid uid-1\\), not to CollmCluster other"):
        kube.apply({**configmap({"a": "3"}, owner=other)})
    assert kube.get("v1", "ConfigMap", "default", "tiny-config")["data"] == {"a": "2"}  # untouched


def test_an_object_made_by_hand_is_not_taken_over(kube):
    manual = configmap({"mine": "yes"}, owner=None)
    manual["metadata"]["name"] = "by-hand"
    kube.create(manual)
    wanted = configmap({"a": "1"})
    wanted["metadata"]["name"] = "by-hand"
    with pytest.raises(NotOwned, match="nobody"):
        kube.apply(wanted)
    assert kube.get("v1", "ConfigMap", "default", "by-hand")["data"] == {"mine": "yes"}


def test_foreign_holder_is_a_pure_decision():
    assert foreign_holder(configmap({}), configmap({})) is None
    assert foreign_holder(configmap({}, owner=None), configmap({})) == "nobody (no controller owner: made by hand?)"
    assert foreign_holder(configmap({}), configmap({}, owner=None)) is None  # a desired object without a controller claims nothing
