from __future__ import annotations

import threading

import pytest
import torch

from replica_agent.engine.adapter_store import AdapterStore, UnknownVersion, adapter_sha256
from replica_agent.engine.budget import TrainingBudget
from replica_agent.engine.detokenize import IncrementalDetokenizer


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full((2, 3), value), "a.lora_B.weight": torch.full((3, 2), -value)}


def test_sha256_is_stable_and_content_sensitive():
    assert adapter_sha256(tensors(1.0)) == adapter_sha256(tensors(1.0))
    assert adapter_sha256(tensors(1.0)) != adapter_sha256(tensors(1.0 + 1e-6))
    renamed = {"b" + k: v for k, v in tensors(1.0).items()}
    assert adapter_sha256(renamed) != adapter_sha256(tensors(1.0))


def test_publish_snapshots_so_later_changes_to_the_source_do_not_leak():
    store = AdapterStore()
    source = tensors(1.0)
    version = store.publish(source, cluster_version=2, step=40, eval_loss=1.5)
    source["a.lora_A.weight"].add_(5)
    assert version.tensors["a.lora_A.weight"].max() == 1.0
    assert version.sha256 == adapter_sha256(tensors(1.0))
    assert (version.number, version.label, version.step, version.eval_loss) == (1, "2.0", 40, 1.5)
    with pytest.raises(TypeError):
        version.tensors["x"] = torch.zeros(1)  # the mapping is read-only


def test_identity_is_cluster_version_dot_local_revision():
    store = AdapterStore(retain=2)
    assert store.publish(tensors(0)).label == "0.0"  # the first publish of an empty store is global 0
    assert [store.publish(tensors(i)).label for i in (1, 2)] == ["0.1", "0.2"]
    g7 = store.publish(tensors(7), cluster_version=7)
    assert g7.label == "7.0" and g7.is_global and store.global_version is g7
    assert store.publish(tensors(8)).label == "7.1"
    for i in range(5):  # the global stays retained whatever the retention window
        store.publish(tensors(10 + i))
    assert g7.number in store.retained() and store.current.label == "7.6"
    assert store.current.summary()["version"] == "7.6" and store.current.summary()["cluster_version"] == 7


def test_a_revision_on_a_stale_global_is_not_published():
    store = AdapterStore()
    g0 = store.publish(tensors(0), cluster_version=0)
    store.publish(tensors(1), cluster_version=1)
    assert store.publish(tensors(2), on_global=g0.sha256) is None
    assert store.current.label == "1.0"
    assert store.publish(tensors(3), on_global=store.global_version.sha256).label == "1.1"


def test_rollback_to_a_global_makes_it_the_global_and_labels_stay_unique():
    store = AdapterStore()
    g1 = store.publish(tensors(1), cluster_version=1)
    assert store.publish(tensors(2)).label == "1.1"
    store.publish(tensors(3), cluster_version=2)
    assert store.rollback(g1.number).label == "1.0" and store.global_version is g1
    assert store.publish(tensors(4)).label == "1.2"  # never a second "1.1"


def test_a_snapshot_restored_into_a_new_store_keeps_labels_and_bounds_versions_without_pins():
    store = AdapterStore(retain=2)
    g1 = store.publish(tensors(1), cluster_version=1)
    for i in (2, 3, 4):
        store.publish(tensors(i))  # 1.1, 1.2, 1.3
    pinned = store.pin_current()  # a request of this process holds 1.3
    store.publish(tensors(5))  # 1.4
    store.publish(tensors(6))  # 1.5
    assert pinned.number in store.retained()
    snap = store.snapshot()
    # the newest two (1.4, 1.5), the global: 1.3 is held only by a request of this process
    assert [v.label for v in snap.versions] == ["1.0", "1.4", "1.5"] and snap.current.label == "1.5" and snap.global_version is g1
    fresh = AdapterStore(retain=2)
    assert fresh.restore(snap) is snap.current and fresh.current is snap.current and fresh.global_version is g1
    assert fresh.publish(tensors(7)).label == "1.6"  # the next label, not a reused one
    with pytest.raises(RuntimeError, match="empty"):
        fresh.restore(snap)
    assert AdapterStore().snapshot() is None


def test_pins_keep_versions_alive_and_retention_drops_the_rest():
    store = AdapterStore(retain=2)
    store.publish(tensors(0))  # 1: the global, always kept
    store.publish(tensors(1))
    pinned = store.pin_current()
    for v in range(2, 6):
        store.publish(tensors(v))
    assert store.retained() == [1, 2, 5, 6]  # 2 is pinned, 5 and 6 are the retention window
    assert store.live_versions() == {2, 6}
    store.release(pinned.number)
    assert store.retained() == [1, 5, 6]
    with pytest.raises(UnknownVersion, match="not retained"):
        store.get(2)
    with pytest.raises(RuntimeError, match="released more often"):
        store.release(2)


def test_a_version_pinned_by_sha256_outlives_publishes_until_released():
    store = AdapterStore(retain=1)
    first = store.publish(tensors(1))
    assert store.pin(adapter_sha256(tensors(9))) is None  # never published: nothing pinned
    pinned = store.pin(first.sha256)
    assert pinned is first and store.pins() == {first.number: 1}
    store.publish(tensors(2), cluster_version=1)
    store.publish(tensors(3))
    assert store.find(first.sha256) is first  # not current, outside the window, but pinned
    store.release(first.number)
    assert store.find(first.sha256) is None and store.pins() == {}


def test_rollback_makes_a_retained_version_current_and_notifies():
    store = AdapterStore()
    seen = []
    store.on_change(lambda v: seen.append(v.number))
    store.publish(tensors(1))
    store.publish(tensors(2))
    assert store.rollback(1).number == 1 and store.current.number == 1
    assert seen == [1, 2, 1]


def test_pin_current_is_atomic_with_publish():
    store = AdapterStore(retain=1)
    store.publish(tensors(0))
    errors = []

    def reader():
        for _ in range(2000):
            v = store.pin_current()
            try:
                store.get(v.number)  # a pinned version is always retrievable, even with retain=1
            except UnknownVersion as exc:
                errors.append(exc)
            store.release(v.number)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(200):
        store.publish(tensors(i))
    for t in threads:
        t.join()
    assert not errors and store.pins() == {}


def test_budget_waits_for_credit_and_caps_the_balance():
    budget = TrainingBudget(max_balance=100)
    assert not budget.acquire(50, timeout=0.01)
    budget.credit(30)
    budget.credit(1000)
    assert budget.balance == 100
    assert budget.acquire(80, timeout=0.01) and budget.balance == 20
    budget.close()
    assert not budget.acquire(1, timeout=0.01)


def test_detokenizer_holds_back_incomplete_utf8(byte_tokenizer):
    text = "héllo 🙂 wörld"
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer, [])
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert "\ufffd" not in "".join(deltas)
    assert deltas[ids.index(0xF0)] == ""  # the first byte of the emoji completes nothing yet
