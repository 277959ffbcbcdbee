"""AgentStats survive the wire (collm.v1.Stats) unchanged, every field included."""

from __future__ import annotations

from dataclasses import fields

from collm_control.stats import AdapterRef, AgentStats, CapacityPoint
from collm_rpc.stats import from_proto, to_proto


def test_every_field_round_trips_through_the_proto():
    full = AgentStats(
        "r0",
        model="tiny",
        adapter=AdapterRef("3.2", 3, "a" * 64, 2, 1.5),
        global_adapter=AdapterRef("3.0", 3, "b" * 64),
        live_versions=("3.0", "3.2"),
        uptime_s=12.5,
        queue_depth=2,
        running=3,
        iterations=40,
        inference_tokens=500,
        requests_finished=9,
        requests_met_slo=8,
        ttft_ms=500,
        tpot_ms=50,
        capacity_profile=(CapacityPoint(0, 8.0, 0.0), CapacityPoint(128, 6.0, 900.0)),
        training_tokens=4096,
        training_steps=8,
        training_share=0.25,
        train_cap_tokens=128,
        train_loss=2.25,
        eval_loss=2.5,
        trainer_error="boom",
        data_error="empty",
        state_error="cannot save: no space",
        data_tokens=44507,
        unuploaded_steps=3,
        revisions_published=2,
        revisions_rejected=1,
        last_revision_at=1796000000.5,
        lora_rank=16,
        lora_alpha=32,
        lora_target_modules=("q_proj", "v_proj"),
        edge_sessions=2,
    )
    assert all(getattr(full, f.name) != f.default for f in fields(AgentStats) if f.name != "extra"), "set every field"
    assert from_proto(to_proto(full)) == full
    empty = AgentStats("r1")  # None stays None, not 0
    assert from_proto(to_proto(empty)) == empty
