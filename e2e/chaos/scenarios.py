"""The faults, each injected for real into the running dev cluster while traffic flows and rounds run.

Each scenario injects its fault, clears it, and returns an `Injection`: when the fault happened and
was cleared, how, and what the scenario itself checked (`checks`: figures and the outcome it
expects, reported beside the common figures the runner computes). The runner (runner.py) waits for
recovery and computes requests, rounds, versions and recovery times around it.

Mechanisms (all on the dev cluster, whose pods are local processes):
- kill-agent-mid-stream: SIGKILL to the process group of an agent that is streaming tokens.
- kill-aggregator-mid-upload: a round with a fixed aggregator; one participant's upload is held open
  half sent (fault hook `stall-upload`), and the aggregator gets SIGKILL while it streams.
- stop-operator-mid-round: SIGKILL to the operator (kopf) while a round trains, restarted 5 s later.
- cut-agent-off-network: SIGSTOP to an agent's process group for `freeze_s`, then SIGCONT. Peers see
  what a partition shows them (connections accepted by the kernel, nothing answered); the agent
  itself is frozen too. No packet filter exists on this machine (no iptables, no tc actions).
- corrupt-upload-chunk: fault hook `corrupt-upload`: one byte of tensor data flipped in the first
  chunk of a participant's upload while the header announces the true sha256.
- fill-data-volume: the agent's state volume is a size-limited tmpfs (mounted by the runner before
  the pod started; needs root): a file fills it until writes fail with ENOSPC, then is removed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..harness import condition

if TYPE_CHECKING:
    from .runner import Chaos


@dataclass
class Injection:
    injected: bool
    mechanism: str
    fault_at: float = 0.0  # unix seconds
    cleared_at: float = 0.0
    checks: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def kill_agent_mid_stream(c: Chaos) -> Injection:
    victim, streams = c.replica_streaming()
    restarts = c.restart_count(victim)
    rests_on = (c.observer.stats(victim) or {}).get("global_adapter") or {}
    t0 = time.time()
    c.h.kill_agent(victim)
    back = c.wait(lambda: c.restart_count(victim) > restarts and c.observer.stats(victim), 180, f"{victim} restarted and answering")
    after = (back or {}).get("global_adapter") or {}
    same = bool(back) and after.get("sha256") == rests_on.get("sha256")
    return Injection(
        True,
        f"SIGKILL to {victim}'s process group with {streams} streams past their first token open on it",
        t0,
        t0,
        checks={
            "victim": victim,
            "streams_past_first_token_at_kill": streams,
            "restarted": bool(back),
            "global_before": f"{rests_on.get('cluster_version')} ({str(rests_on.get('sha256'))[:12]})",
            "global_after_restart": f"{after.get('cluster_version')} ({str(after.get('sha256'))[:12]})",
            "expected": "the victim restarts and serves the global it rested on (from its volume)",
            "expected_met": same,
        },
    )


def kill_aggregator_mid_upload(c: Chaos) -> Injection:
    first, second, aggregator = c.replicas[0], c.replicas[1], c.replicas[2]
    name = c.round_name("chaos-aggregator")
    c.arm(second, "stall-upload", round=name, seconds=c.settings.stall_s)
    c.create_round(name, participants=[first, second], aggregator=aggregator, localSteps=3, deadlineSeconds=90, minParticipants=2)
    streaming = c.fault_file(second, "stall-upload.streaming")
    if not c.wait(streaming.exists, 180, f"{second}'s upload streaming to {aggregator}", quiet=True):
        c.disarm(second, "stall-upload")
        return Injection(False, "no upload was streaming", note=f"{second}'s upload of {name} never started: {c.round_summary(name)}")
    t0 = time.time()
    c.h.kill_agent(aggregator)
    rec = c.wait_round(name, 240)
    fired = c.fired(second, "stall-upload")
    expected = rec is not None and rec.succeeded is False and "aggregator" in f"{rec.reason} {rec.message}".lower()
    return Injection(
        True,
        f"SIGKILL to aggregator {aggregator} while {second}'s upload streamed ({fired.get('sent_bytes')} of {fired.get('total_bytes')} bytes sent)",
        t0,
        t0,
        checks={
            "victim": aggregator,
            "round": name,
            "round_result": c.round_summary(name),
            "expected": "the round fails with a reason naming the aggregator; nothing of it is published",
            "expected_met": expected,
        },
    )


def stop_operator_mid_round(c: Chaos) -> Injection:
    participants = c.replicas[:2]
    name = c.round_name("chaos-operator")
    c.create_round(name, participants=participants, localSteps=c.steps_for(participants, seconds=20), deadlineSeconds=120, minParticipants=2)
    started = c.wait(lambda: (r := c.observer.rounds.get(name)) is not None and r.started_at, 180, f"{name} started")
    trained = condition(c.h.get("adapterround", name), "Trained").get("status")
    t0 = time.time()
    c.h.kill_operator()
    time.sleep(5)
    c.h.start_operator()
    t1 = time.time()
    rec = c.wait_round(name, 300)
    events = c.h.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    reasons = [e.get("reason") for e in json.loads(events).get("items", [])]
    once = reasons.count("RoundStarted") == 1 and reasons.count("Published") == (1 if rec and rec.succeeded else 0)
    return Injection(
        bool(started),
        f"SIGKILL to the operator (kopf) while {name} was training (Trained={trained}), started again 5 s later",
        t0,
        t1,
        checks={
            "round": name,
            "round_result": c.round_summary(name),
            "round_started_events": reasons.count("RoundStarted"),
            "published_events": reasons.count("Published"),
            "expected": "the round ends once (one RoundStarted event; one Published event if it succeeded)",
            "expected_met": bool(rec and rec.succeeded is not None and once),
        },
    )


def cut_agent_off_network(c: Chaos) -> Injection:
    victim, streams = c.replica_streaming()
    t0 = time.time()
    c.h.signal_agent(victim, signal.SIGSTOP)
    try:
        time.sleep(min(15.0, c.settings.freeze_s / 2))
        healthy = c.router_gauge("collm_router_replica_healthy", victim)
        time.sleep(max(0.0, t0 + c.settings.freeze_s - time.time()))
    finally:
        c.h.signal_agent(victim, signal.SIGCONT)
    t1 = time.time()
    back = c.wait(lambda: c.observer.stats(victim), 60, f"{victim} answering after SIGCONT")
    return Injection(
        True,
        f"SIGSTOP to {victim}'s process group for {c.settings.freeze_s:g} s ({streams} streams past their first token open on it), then SIGCONT",
        t0,
        t1,
        checks={
            "victim": victim,
            "router_health_gauge_mid_freeze": healthy,
            "answers_after_thaw": bool(back),
            "expected": "the router stops routing to the frozen replica; streams it held end with an error event; it answers after SIGCONT",
            "expected_met": healthy == 0.0 and bool(back),
        },
    )


def corrupt_upload_chunk(c: Chaos) -> Injection:
    corrupt, honest, aggregator = c.replicas[0], c.replicas[1], c.replicas[2]
    name = c.round_name("chaos-corrupt")
    c.arm(corrupt, "corrupt-upload", round=name)
    c.create_round(name, participants=[corrupt, honest], aggregator=aggregator, localSteps=3, deadlineSeconds=90, minParticipants=1)
    rec = c.wait_round(name, 240)
    fired = c.fired(corrupt, "corrupt-upload")
    if not fired:
        c.disarm(corrupt, "corrupt-upload")
        return Injection(False, "no upload was corrupted", note=f"{corrupt} sent no upload in {name}: {c.round_summary(name)}")
    entry = next((p for p in (rec.participants if rec else []) if p.get("name") == corrupt), {})
    refused = entry.get("outcome") != "Accepted" and "sha256 mismatch" in str(entry.get("reason"))
    return Injection(
        True,
        f"byte {fired.get('byte')} of {fired.get('chunk_bytes')} flipped in {corrupt}'s first upload chunk to {aggregator}",
        float(fired["at"]),
        float(fired["at"]),
        checks={
            "round": name,
            "round_result": c.round_summary(name),
            "corrupt_participant": {"outcome": entry.get("outcome"), "reason": entry.get("reason")},
            "expected": "the aggregator refuses the upload as corrupt (sha256 mismatch); the round goes on without it",
            "expected_met": refused,
        },
    )


def fill_data_volume(c: Chaos) -> Injection:
    victim = c.fill_victim
    if c.fill_dir is None:
        return Injection(False, "no size-limited volume", note=c.fill_skip_reason)
    log = c.h.dc.kubelet.log_path(c.h.namespace, victim, "agent")
    log_from = log.stat().st_size if log.exists() else 0
    filler = c.fill_dir / "chaos-filler"
    t0 = time.time()
    filled = fill(filler)
    name = c.round_name("chaos-fill")  # a publish lands on the full volume while it is full
    c.create_round(name, localSteps=3, deadlineSeconds=60)
    c.wait_round(name, 240)
    time.sleep(max(0.0, t0 + 3 * c.checkpoint_s - time.time()))  # at least a few checkpoints fail
    full_until = time.time()
    lines = _read_from(log, log_from).splitlines()
    errors = [line.split(" ", 2)[-1] for line in lines if " ERROR replica_agent.engine.state" in line]
    enospc = sum("No space left on device" in line for line in lines)
    filler.unlink()
    t1 = time.time()
    shadow = c.fill_dir / "shadow.pt"
    rewritten = c.wait(lambda: shadow.exists() and shadow.stat().st_mtime > t1, 60, "a shadow checkpoint after the volume was freed", quiet=True)
    c.wait(lambda: manifest_global(c.fill_dir) == ((c.observer.stats(victim) or {}).get("global_adapter") or {}).get("sha256"), 60, "", quiet=True)
    on_disk = check_state(c.fill_dir)
    # Restart from that volume: what comes back must be a published version (the verdict checks it).
    restarts = c.restart_count(victim)
    c.h.kill_agent(victim)
    back = c.wait(lambda: c.restart_count(victim) > restarts and c.observer.stats(victim), 180, f"{victim} back from its volume")
    served_while_full = [r for r in c.traffic.snapshot() if r.replica == victim and t0 <= r.started and r.ended <= full_until and r.outcome == "completed"]
    return Injection(
        True,
        f"{filled / 2**20:.1f} MiB written to {victim}'s {c.settings.fill_size_mb} MiB state volume until ENOSPC, "
        f"held {full_until - t0:.0f} s, removed; then SIGKILL",
        t0,
        t1,
        checks={
            "victim": victim,
            "write_errors_logged": len(errors),
            "enospc_tracebacks": enospc,
            "first_write_error": errors[0][:240] if errors else None,
            "requests_served_by_victim_while_full": len(served_while_full),
            "round_while_full": c.round_summary(name),
            "checkpoint_written_after_free": bool(rewritten),
            "state_on_disk_after_free": on_disk,
            "restarted_from_volume_serving": ((back or {}).get("adapter") or {}).get("version"),
            "expected": "the agent serves while its volume is full, logs why writes fail, and writes a consistent state once freed",
            "expected_met": bool(errors) and bool(served_while_full) and bool(rewritten) and on_disk == "consistent",
        },
    )


def fill(path: Path) -> int:
    """Write `path` until the volume is full (ENOSPC), in MiB then page-sized blocks; bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for block in (b"\0" * (1 << 20), b"\0" * 4096):
            while True:
                try:
                    written += f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def manifest_global(state_dir: Path) -> str | None:
    try:
        return json.loads((state_dir / "manifest.json").read_text())["global"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_state(state_dir: Path) -> str:
    """'consistent' when the manifest reads and every version it names is on disk with its sha256; else what is wrong."""
    from replica_agent.engine.archive import load_archived

    try:
        manifest = json.loads((state_dir / "manifest.json").read_text())
        for entry in manifest["versions"]:
            load_archived(state_dir / "adapters", entry["sha256"])
    except Exception as exc:  # noqa: BLE001  any failure is the finding
        return f"{type(exc).__name__}: {exc}"
    return "consistent"


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


SCENARIOS: dict[str, Callable[[Chaos], Injection]] = {  # the run's default order
    "corrupt-upload-chunk": corrupt_upload_chunk,
    "kill-agent-mid-stream": kill_agent_mid_stream,
    "kill-aggregator-mid-upload": kill_aggregator_mid_upload,
    "stop-operator-mid-round": stop_operator_mid_round,
    "fill-data-volume": fill_data_volume,
    "cut-agent-off-network": cut_agent_off_network,
}


def arm(root: Path, pod: str, fault: str, **params: Any) -> None:
    """Arm a fault of devcluster/fault_hook.py for `pod` (written atomically: the hook reads it whole)."""
    folder = root / pod
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{fault}.tmp"
    tmp.write_text(json.dumps(params))
    os.replace(tmp, folder / f"{fault}.json")
