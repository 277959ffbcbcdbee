"""Secure aggregation: masked updates hide each update, their sum is FedAvg, dropouts recover."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replica_agent.federated.aggregation import AggregationError, FedAvg, clip_update, update_norm
from replica_agent.federated.secure import (
    SCALE,
    SecureAggregator,
    announcement_refusal,
    decode_masked,
    encode_masked,
    mask_update,
    pair_seeds,
    reveal_refusal,
    reveal_seeds,
)
from replica_agent.federated.update import UpdateError

from .test_update import global_adapter, updates_for

SECRET = b"participants-only-round-secret-32"
NAMES = ["p0", "p1", "p2", "p3"]


def masked_round(samples=(3, 5, 7, 11), *, clip_norm=None):
    updates = updates_for(global_adapter(), list(samples))
    names = [u.participant for u in updates]
    masked = [mask_update(u, names, pair_seeds(u.participant, names, SECRET, "r1"), clip_norm=clip_norm) for u in updates]
    return updates, masked


def assert_close(got, want, atol=1e-5):
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=0, atol=atol)


def test_pair_seeds_agree_per_pair_and_differ_per_round():
    a, b = pair_seeds("p0", NAMES, SECRET, "r1"), pair_seeds("p2", NAMES, SECRET, "r1")
    assert set(a) == {"p1", "p2", "p3"} and a["p2"] == b["p0"]
    assert len(set(a.values())) == 3
    assert pair_seeds("p0", NAMES, SECRET, "r2")["p2"] != a["p2"]
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pair_seeds("p0", NAMES, b"short", "r1")


def test_masked_updates_hide_each_update_and_their_sum_is_fedavg():
    updates, masked = masked_round()
    for update, m in zip(updates, masked):
        values = torch.cat([t.flatten() for t in m.masked.values()]).numpy()
        plain = np.concatenate([torch.round(update.delta[k].double().flatten() * update.num_samples * SCALE).to(torch.int64).numpy() for k in m.masked])
        assert (values != plain).mean() > 0.99
        unit = values.view(np.uint64) / 2.0**64  # uniform on [0, 1) if the mask hides the update
        assert abs(unit.mean() - 0.5) < 0.04 and abs((unit > 0.5).mean() - 0.5) < 0.05
        assert abs(np.corrcoef(values.astype(np.float64), plain.astype(np.float64))[0, 1]) < 0.15

    aggregator = SecureAggregator("r1", NAMES)
    assert all(aggregator.add(m) for m in masked)
    assert aggregator.missing() == set()
    assert_close(aggregator.unmask(), FedAvg().aggregate(updates).delta)


def test_dropout_after_masking_is_recovered_from_revealed_seeds():
    updates, masked = masked_round()
    aggregator = SecureAggregator("r1", NAMES)
    for m in masked[:1] + masked[2:]:  # p1 masked its update but never delivered it
        aggregator.add(m)
    assert aggregator.missing() == {"p1"}
    dropped = aggregator.close()
    assert dropped == {"p1"}
    assert aggregator.add(masked[1]) is False  # too late: ignored, the survivors already reveal p1's seeds
    with pytest.raises(AggregationError, match="must reveal the seeds"):
        aggregator.unmask()
    revealed = {}
    for name in aggregator.survivors:
        revealed.update(reveal_seeds(name, sorted(dropped), pair_seeds(name, NAMES, SECRET, "r1")))
    assert set(revealed) == {("p0", "p1"), ("p1", "p2"), ("p1", "p3")}
    survivors = [u for u in updates if u.participant != "p1"]
    assert_close(aggregator.unmask(revealed), FedAvg().aggregate(survivors).delta)


def test_participants_clip_and_check_before_masking():
    updates = updates_for(global_adapter(), [3, 5, 7])
    clip = 0.5 * min(update_norm(u.delta) for u in updates)
    _, masked = masked_round((3, 5, 7), clip_norm=clip)
    aggregator = SecureAggregator("r1", ["p0", "p1", "p2"])
    for m in masked:
        aggregator.add(m)
    expected = FedAvg().aggregate([clip_update(u, clip) for u in updates]).delta
    assert_close(aggregator.unmask(), expected)

    broken = updates[0]
    broken.delta[next(iter(broken.delta))][0, 0] = float("nan")
    with pytest.raises(UpdateError, match="must not be uploaded"):
        mask_update(broken, ["p0", "p1", "p2"], pair_seeds("p0", ["p0", "p1", "p2"], SECRET, "r1"))


def test_aggregator_refuses_foreign_duplicate_and_too_few_updates():
    _, masked = masked_round()
    aggregator = SecureAggregator("r2", NAMES)
    with pytest.raises(UpdateError, match="does not belong"):
        aggregator.add(masked[0])
    aggregator = SecureAggregator("r1", NAMES)
    aggregator.add(masked[0])
    with pytest.raises(UpdateError, match="already uploaded"):
        aggregator.add(masked[0])
    with pytest.raises(AggregationError, match="needs >= 2"):  # one survivor's "sum" would be its update
        aggregator.unmask({("p0", d): b"x" * 32 for d in ("p1", "p2", "p3")})


def test_masked_update_bytes_round_trip():
    _, masked = masked_round()
    back = decode_masked(encode_masked(masked[0]))
    assert (back.participant, back.round_id, back.base_sha256, back.num_samples) == (masked[0].participant, "r1", masked[0].base_sha256, 3)
    assert all(torch.equal(back.masked[k], masked[0].masked[k]) for k in masked[0].masked)


def test_the_survivors_seeds_unmask_an_update_alone_so_an_announced_upload_keeps_them():
    """The finding: the aggregator received p1's update, named p1 dropped, and the survivors' seeds unmasked it alone."""
    updates, masked = masked_round()
    revealed = {}
    for name in ("p0", "p2", "p3"):
        revealed.update(reveal_seeds(name, ["p1"], pair_seeds(name, NAMES, SECRET, "r1")))
    alone = SecureAggregator("r1", NAMES, min_survivors=1)
    alone.add(masked[1])  # p1's masked update, which the aggregator held while it named p1 dropped
    assert_close(alone.unmask(revealed), updates[1].delta)  # p1's update in the clear: its masks were its only protection
    # Hence no survivor reveals the seeds of a peer that announced its upload...
    assert "['p1']" in reveal_refusal("p0", ["p1", "p3"], announced={"p1", "p2"})
    assert reveal_refusal("p0", ["p3"], announced={"p1", "p2"}) is None
    # ...and no peer whose seeds were revealed gets its announcement acknowledged (it must not upload then).
    assert "already revealed" in announcement_refusal("p0", "p1", NAMES, revealed={"p1"})
    assert announcement_refusal("p0", "p1", NAMES, revealed=set()) is None
    assert "not another participant" in announcement_refusal("p0", "p0", NAMES, revealed=set())
    assert "not another participant" in announcement_refusal("p0", "stranger", NAMES, revealed=set())
