"""Round after round, a replica holds a bounded set of tensors.

What each replica keeps per round is bounded: an aggregator's last ROUNDS_KEPT rounds (uploads
released once a round has its result), their candidates, a participant's fetched candidates
(FETCHED_KEPT), the adapter store's `adapter_retain` versions. So once those bounds are reached,
more rounds add no tensor bytes (beyond a revision or two alive at the moment of a count). A soak
showed replicas' resident memory climbing at rounds (docs/reliability.md); this test tells a kept
tensor from the allocator's behaviour, which the process's resident size cannot.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import replace

import torch

from collm_control import rounds as R
from collm_rpc.driver import RoundDriver
from replica_agent.federated.aggregator import ROUNDS_KEPT
from replica_agent.local.in_process import LocalCluster
from tests.federated.test_rounds_e2e import configs


def held_tensor_bytes() -> int:
    """Bytes of every storage a live Python tensor object refers to, each storage once."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no __class__ lookups on odd objects
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def quiet_tensor_bytes(cluster) -> int:
    """held_tensor_bytes with training paused on every replica (its cap at 0, its last step done), so
    that a training step's activations and gradients in flight do not count; then training resumes."""
    agents = [r.agent for r in cluster.replicas.values()]
    settings = [a.mixer.settings for a in agents]
    for a, s in zip(agents, settings):
        a.mixer.update_settings(replace(s, cap_tokens_per_iteration=0))
    steps = None
    while steps != (steps := [a.trainer.step for a in agents]):
        time.sleep(0.3)
    try:
        return held_tensor_bytes()
    finally:
        for a, s in zip(agents, settings):
            a.mixer.update_settings(s)


def test_rounds_past_every_retention_bound_hold_no_more_tensors(tiny_base):
    # The store keeps 2 versions, so its bound is reached first; local revisions on, as in a soak.
    two = [c.model_copy(update={"revision_every_seconds": 0.5}) for c in configs(adapter_retain=2)[:2]]
    names = tuple(c.replica_id for c in two)
    plateau, extra = ROUNDS_KEPT + 2, 6
    with LocalCluster(two, base=tiny_base) as cluster:
        adapter_bytes = sum(t.nbytes for t in cluster["agent-0"].agent.store.current.tensors.values())
        held = []
        for n in range(1, plateau + extra + 1):
            spec = R.RoundSpec(
                round_id=f"m{n}",
                replicas=names,
                participants=names,
                aggregator="agent-0",
                local_steps=1,
                deadline_s=60.0,
                min_participants=2,
                eval_tolerance=10.0,  # every candidate publishes: each round adds a version
            )
            state = RoundDriver(spec, cluster.addresses, round_number=n).run(timeout_s=60)
            assert state.succeeded, state.conditions[R.Condition.SUCCEEDED]
            if n >= plateau:
                held.append(quiet_tensor_bytes(cluster))
    # Medians of the first and last three counts: whether a local revision or two (an adapter each)
    # are alive at the moment of a count depends on timing, so one count moves by up to two adapters;
    # a round's candidate and delta kept add two adapters a round, eight between those medians.
    growth = statistics.median(held[-3:]) - statistics.median(held[:3])
    assert growth < 3 * adapter_bytes, f"{extra} more rounds kept {growth} more tensor bytes (one adapter is {adapter_bytes}): {held}"
