"""collm.v1.Stats <-> collm_control.stats.AgentStats: the typed contract on both sides of GetStats.

proto3 scalars have no "unset": an optional number travels with a has_<name> flag, an absent
adapter as an empty AdapterRef (no sha256), an absent time as 0."""

from __future__ import annotations

from collm_control.stats import AdapterRef, AgentStats, CapacityPoint

from .proto import collm_pb2 as pb


def ref_to_proto(ref: AdapterRef | None) -> pb.AdapterRef:
    if ref is None:
        return pb.AdapterRef()
    return pb.AdapterRef(
        version=ref.version,
        cluster_version=ref.cluster_version,
        sha256=ref.sha256,
        revision=ref.revision,
        eval_loss=ref.eval_loss or 0.0,
        has_eval_loss=ref.eval_loss is not None,
    )


def ref_from_proto(ref: pb.AdapterRef) -> AdapterRef | None:
    if not ref.sha256:
        return None
    return AdapterRef(ref.version, ref.cluster_version, ref.sha256, ref.revision, ref.eval_loss if ref.has_eval_loss else None)


def to_proto(s: AgentStats) -> pb.Stats:
    return pb.Stats(
        replica_id=s.replica_id,
        model=s.model,
        adapter=ref_to_proto(s.adapter),
        global_adapter=ref_to_proto(s.global_adapter),
        live_versions=list(s.live_versions),
        uptime_s=s.uptime_s,
        queue_depth=s.queue_depth,
        running=s.running,
        iterations=s.iterations,
        inference_tokens=s.inference_tokens,
        requests_finished=s.requests_finished,
        requests_met_slo=s.requests_met_slo,
        ttft_ms=s.ttft_ms,
        tpot_ms=s.tpot_ms,
        capacity_profile=[
            pb.CapacityPoint(cap=p.cap, requests_per_s=p.requests_per_s, training_tokens_per_s=p.training_tokens_per_s) for p in s.capacity_profile
        ],
        training_tokens=s.training_tokens,
        training_steps=s.training_steps,
        training_share=s.training_share,
        train_cap_tokens=s.train_cap_tokens,
        train_loss=s.train_loss or 0.0,
        has_train_loss=s.train_loss is not None,
        eval_loss=s.eval_loss or 0.0,
        has_eval_loss=s.eval_loss is not None,
        trainer_error=s.trainer_error,
        data_error=s.data_error,
        data_tokens=s.data_tokens,
        unuploaded_steps=s.unuploaded_steps,
        revisions_published=s.revisions_published,
        revisions_rejected=s.revisions_rejected,
        last_revision_unix=s.last_revision_at or 0.0,
        lora_rank=s.lora_rank,
        lora_alpha=s.lora_alpha,
        lora_target_modules=list(s.lora_target_modules),
    )


def from_proto(m: pb.Stats) -> AgentStats:
    return AgentStats(
        replica_id=m.replica_id,
        model=m.model,
        adapter=ref_from_proto(m.adapter),
        global_adapter=ref_from_proto(m.global_adapter),
        live_versions=tuple(m.live_versions),
        uptime_s=m.uptime_s,
        queue_depth=m.queue_depth,
        running=m.running,
        iterations=m.iterations,
        inference_tokens=m.inference_tokens,
        requests_finished=m.requests_finished,
        requests_met_slo=m.requests_met_slo,
        ttft_ms=m.ttft_ms,
        tpot_ms=m.tpot_ms,
        capacity_profile=tuple(CapacityPoint(p.cap, p.requests_per_s, p.training_tokens_per_s) for p in m.capacity_profile),
        training_tokens=m.training_tokens,
        training_steps=m.training_steps,
        training_share=m.training_share,
        train_cap_tokens=m.train_cap_tokens,
        train_loss=m.train_loss if m.has_train_loss else None,
        eval_loss=m.eval_loss if m.has_eval_loss else None,
        trainer_error=m.trainer_error,
        data_error=m.data_error,
        data_tokens=m.data_tokens,
        unuploaded_steps=m.unuploaded_steps,
        revisions_published=m.revisions_published,
        revisions_rejected=m.revisions_rejected,
        last_revision_at=m.last_revision_unix or None,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_target_modules=tuple(m.lora_target_modules),
    )
