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
    key_map_refusal,
    mask_update,
    new_key_pair,
    pair_seed,
    pair_seeds,
    reveal_refusal,
    reveal_seeds,
)
from replica_agent.federated.update import UpdateError

from .test_update import global_adapter, updates_for

NAMES = ["p0", "p1", "p2", "p3"]


def key_exchange(names, round_id="r1"):
    """What a round's key exchange leaves: every participant's pair seeds, and the public keys (all anyone else sees)."""
    pairs = {name: new_key_pair() for name in names}
    public = {name: pk for name, (_, pk) in pairs.items()}
    return {name: pair_seeds(name, sk, public, round_id) for name, (sk, _) in pairs.items()}, public


SEEDS, PUBLIC_KEYS = key_exchange(NAMES)


def masked_round(samples=(3, 5, 7, 11), *, clip_norm=None):
    updates = updates_for(global_adapter(), list(samples))
    names = [u.participant for u in updates]
    masked = [mask_update(u, names, SEEDS[u.participant], clip_norm=clip_norm) for u in updates]
    return updates, masked


def assert_close(got, want, atol=1e-5):
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=0, atol=atol)


def test_both_ends_derive_the_same_pair_seed_and_it_differs_per_pair_and_round():
    a, b = SEEDS["p0"], SEEDS["p2"]
    assert set(a) == {"p1", "p2", "p3"} and a["p2"] == b["p0"] and len(a["p2"]) == 32
    assert len({seed for seeds in SEEDS.values() for seed in seeds.values()}) == 6  # one per pair
    assert key_exchange(NAMES)[0]["p0"]["p2"] != a["p2"]  # fresh keys every round
    (sk0, pk0), (sk2, pk2) = new_key_pair(), new_key_pair()
    r1, r2 = pair_seeds("p0", sk0, {"p0": pk0, "p2": pk2}, "r1"), pair_seeds("p0", sk0, {"p0": pk0, "p2": pk2}, "r2")
    assert r1["p2"] == pair_seeds("p2", sk2, {"p0": pk0, "p2": pk2}, "r1")["p0"] and r1["p2"] != r2["p2"]  # the round id is bound in
    with pytest.raises(ValueError):  # a low-order point agrees on nothing
        pair_seeds("p0", sk0, {"p0": pk0, "p2": bytes(32)}, "r1")


def test_whoever_holds_only_the_public_keys_cannot_derive_a_seed_that_unmasks():
    """The aggregator and the operator see every public key but no private key: any seed they derive
    from that leaves the mask on; only the seeds of the key pairs' holders take it off."""
    updates, masked = masked_round()
    sk_outsider, pk_outsider = new_key_pair()
    pk = PUBLIC_KEYS
    guesses = {  # per pair (p1, j): seeds from public information only
        "own key pair against the public keys": {j: pair_seeds("p1", sk_outsider, {"p1": pk_outsider, j: pk[j]}, "r1")[j] for j in NAMES if j != "p1"},
        "the public keys as the shared secret": {j: pair_seed(pk["p1"] + pk[j], "r1", "p1", j) for j in NAMES if j != "p1"},
        "the other public key as the shared secret": {j: pair_seed(pk[j], "r1", "p1", j) for j in NAMES if j != "p1"},
    }
    for how, seeds in guesses.items():
        assert not set(seeds.values()) & set(SEEDS["p1"].values()), how
        alone = SecureAggregator("r1", NAMES, min_survivors=1)
        alone.add(masked[1])
        got = alone.unmask({("p1", j): seed for j, seed in seeds.items()})
        assert all((got[k] - updates[1].delta[k]).abs().max() > 1.0 for k in got), how  # masks did not cancel
    alone = SecureAggregator("r1", NAMES, min_survivors=1)
    alone.add(masked[1])
    assert_close(alone.unmask({("p1", j): seed for j, seed in SEEDS["p1"].items()}), updates[1].delta)  # the holders' seeds do


def test_a_participant_refuses_a_key_map_without_its_own_public_key_unchanged():
    keys = dict(PUBLIC_KEYS)
    assert key_map_refusal("p0", keys["p0"], NAMES, keys) is None
    assert "own public key unchanged" in key_map_refusal("p0", keys["p0"], NAMES, {**keys, "p0": new_key_pair()[1]})
    assert "own public key unchanged" in key_map_refusal("p0", keys["p0"], NAMES, {p: k for p, k in keys.items() if p != "p0"})
    assert "not participants" in key_map_refusal("p0", keys["p0"], NAMES, {**keys, "mallory": new_key_pair()[1]})
    assert "alone" in key_map_refusal("p0", keys["p0"], NAMES, {"p0": keys["p0"]})
    assert "32-byte" in key_map_refusal("p0", keys["p0"], NAMES, {**keys, "p1": b"short"})
    assert "same public key" in key_map_refusal("p0", keys["p0"], NAMES, {**keys, "p1": keys["p2"]})


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
        revealed.update(reveal_seeds(name, sorted(dropped), SEEDS[name]))
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
        mask_update(broken, ["p0", "p1", "p2"], SEEDS["p0"])


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
        revealed.update(reveal_seeds(name, ["p1"], SEEDS[name]))
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
