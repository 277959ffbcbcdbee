"""`collm bench cloud-edge --quick` end to end (tiny model, one client, one link): its figures add up."""

from __future__ import annotations

import pytest

from collm_bench import cloud_edge
from replica_agent.edge.collab import HEADER_BYTES


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "cloud-edge.json"
    result = cloud_edge.run(("tiny",), links=("10ms-100Mbit",), clients=(1,), thresholds=(0.5, 0.9), quick=True, json_path=str(path))
    assert path.is_file()
    return result["models"][0]


def by_mode(figures) -> dict:
    return {r["mode"]: r for r in figures["rows"]}


def test_every_mode_ran_and_shares_are_fractions(figures):
    rows = by_mode(figures)
    assert set(rows) == {"cloud-only", "naive", "standalone", "collab@0.5", "collab@0.9"}
    for r in rows.values():
        assert r["tokens"] > 0 and r["total_s"] > 0 and r["standalone_tokens"] == (r["tokens"] if r["mode"] == "standalone" else 0)
        for key in ("edge_share", "agreement"):
            assert 0.0 <= r[key] <= 1.0, (r["mode"], key, r[key])
        assert r["cloud_busy_saved"] <= 1.0 and r["communication_s"] >= 0


def test_cloud_only_and_naive_are_the_whole_model_and_standalone_is_the_head(figures):
    rows = by_mode(figures)
    assert rows["cloud-only"]["edge_share"] == 0 and rows["cloud-only"]["edge_compute_s"] == 0
    assert rows["naive"]["edge_share"] == 0
    assert rows["cloud-only"]["agreement"] == 1.0  # the replica's engine decodes what the split reference does
    assert rows["naive"]["cross_entropy"] == figures["quality"]["whole"]
    assert rows["standalone"]["edge_share"] == 1.0 and rows["standalone"]["cross_entropy"] == figures["quality"]["exit_head"]
    assert rows["collab@0.9"]["edge_share"] <= rows["collab@0.5"]["edge_share"]


def test_bytes_per_token_are_state_plus_header_plus_framing(figures):
    rows = by_mode(figures)
    state = figures["state_bytes_fp16"]
    assert state == HEADER_BYTES + 2 * figures["hidden"]
    assert rows["standalone"]["wire_bytes_up"] == 0 and rows["standalone"]["bytes_per_token"] == 0
    for mode in ("collab@0.5", "collab@0.9", "naive"):
        r = rows[mode]
        assert r["payload_bytes_per_state"] == state
        assert 0 < r["wire_bytes_per_state"] - state < 128, (mode, r["wire_bytes_per_state"])  # gRPC, HTTP/2 and TLS framing
    # collaborative: each position's state goes up once; naive: all of them with every token
    assert rows["naive"]["states_sent"] > rows["collab@0.5"]["states_sent"]
