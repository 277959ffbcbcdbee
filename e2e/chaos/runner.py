"""The chaos runner: a dev cluster under traffic and rounds, faults injected one scenario at a time.

    python -m e2e.chaos --json reports/chaos.json [--scenario NAME ...]    (from a clone)
    collm bench chaos --json reports/chaos.json [--scenario NAME ...]

Brings up the emulated cluster (e2e/devcluster) with the real operator and a CollmCluster of three
replicas of the built-in tiny model (the e2e scenarios' example, harness.example_cluster), streams
requests through the router without pause (traffic.py) while the operator runs a round every
20 s, and runs each scenario (scenarios.py) from the steady state: every pod ready, every replica
resting on the cluster's adapter and each serving traffic. Around each fault it measures requests
(completed, explicit error event, refused, lost), rounds (succeeded, failed with their reason), the
versions each replica served against the published ones (verdict.py defines half-applied), and the
time to recover: fault -> first completed request that started after it, first round that
succeeded after it, and the steady state again (polled: about 1 s resolution). Scenario windows
tile the run (each starts where the previous ended) and a request counts in the window where it
ended, where the fault that ended it is: every request counts exactly once.
A scenario passes with 0 requests lost and 0 half-applied versions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..harness import DevHarness, example_cluster, write_training_data
from .observer import Observer, RoundRecord, recovered, serving_snapshot
from .scenarios import SCENARIOS, Injection, arm
from .traffic import COMPLETED, RequestRecord, Traffic
from .verdict import Served, disagreements, first_after, half_applied, parse_label, passed, request_figures

NAME = "tiny"
T = TypeVar("T")
MACHINE = "2-core shared CPU development machine, no GPU"


@dataclass
class Settings:
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    replicas: int = 3
    round_interval_s: int = 20
    checkpoint_s: int = 3
    freeze_s: float = 40.0  # past the router's 30 s stream idle timeout: streams on the frozen replica end with an error event
    stall_s: float = 20.0
    fill_size_mb: int = 64
    concurrency: int = 3
    max_new_tokens: int = 24
    recovery_timeout_s: float = 240.0
    settle_s: float = 5.0
    workdir: str | None = None


@dataclass
class Window:
    scenario: str
    start: float  # where the previous window ended: the steady state before the fault is in it
    end: float
    injection: Injection
    recovered_at: float | None
    before: dict
    after: dict
    retries: float | None
    disagreements: list[str]


class Chaos:
    """The running cluster, its traffic and observer, and the helpers the scenarios use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replicas = [f"{NAME}-{i}" for i in range(settings.replicas)]
        self.checkpoint_s = settings.checkpoint_s
        self.fill_victim = self.replicas[-1]
        self.fill_dir: Path | None = None
        self.fill_skip_reason = "fill-data-volume was not selected"
        self._rounds_made = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def up(self) -> None:
        from replica_agent.engine.tiny import ensure_tiny_model

        ensure_tiny_model()
        root = Path(self.settings.workdir or tempfile.mkdtemp(prefix="collm-chaos-"))
        self.root, self.faults = root, root / "faults"
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.h = DevHarness(root / "devcluster", write_training_data(data), faults_dir=self.faults, before_start=self._prepare_fill_volume)
        obj = example_cluster(self.h)
        spec = obj["spec"]
        spec["replicas"] = self.settings.replicas
        interval = self.settings.round_interval_s
        spec["federation"].update(roundIntervalSeconds=interval, deadlineSeconds=max(5, interval - 5), localSteps=5, minParticipants=2, roundHistoryLimit=1000)
        spec["state"] = {"checkpointIntervalSeconds": self.checkpoint_s}
        self.h.apply(obj)
        self.observer = Observer(self.h, NAME, self.replicas).start()  # from the first adapter on: version 0 is published too
        self.h.kubectl("wait", "--for=condition=Ready", f"collmcluster/{NAME}", "--timeout=400s", timeout=420)
        self.wait(
            lambda: (snap := self.observer.latest()) is not None and recovered(snap), 300, "every replica resting on the cluster's adapter", required=True
        )
        self.traffic = Traffic(self._router_url, concurrency=self.settings.concurrency, max_new_tokens=self.settings.max_new_tokens).start()
        self.traffic_started = time.time()
        self.wait(lambda: self._steady(self.traffic_started), 120, "every replica serving traffic", required=True)

    def down(self) -> None:
        for part in ("traffic", "observer"):
            if hasattr(self, part):
                getattr(self, part).stop()
        if hasattr(self, "h"):
            self.h.kubectl("delete", "collmcluster", "--all", "--wait=false", check=False)
            self.h.close()
        if self.fill_dir is not None and subprocess.run(["umount", str(self.fill_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.fill_dir)], capture_output=True)  # still busy: detach it now, freed when unused

    def _prepare_fill_volume(self, kubelet_dir: Path) -> None:
        """The fill victim's state claim becomes a size-limited tmpfs before its pod exists (root only)."""
        if "fill-data-volume" not in self.settings.scenarios:
            return
        if os.geteuid() != 0:
            self.fill_skip_reason = "needs root: the state volume is a size-limited tmpfs mounted by the runner"
            return
        path = kubelet_dir / "claims" / f"{DevHarness.namespace}_state-{self.fill_victim}"
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.settings.fill_size_mb}m", "collm-chaos-state", str(path)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            self.fill_skip_reason = f"mount -t tmpfs failed: {proc.stderr.strip()}"
            return
        self.fill_dir = path

    # -- helpers for the scenarios ----------------------------------------------------------------
    def wait(self, predicate: Callable[[], T], timeout_s: float, what: str, *, quiet: bool = False, required: bool = False) -> T | None:
        """`predicate()` once it is truthy; None after `timeout_s` (AssertionError when `required`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except (OSError, ValueError, KeyError, LookupError, AssertionError):
                value = None
            if value:
                return value
            time.sleep(0.2)
        if required:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        if not quiet:
            print(f"  (timed out after {timeout_s:g} s waiting for {what})", flush=True)
        return None

    def _steady(self, since: float) -> float | None:
        """Now, once the cluster is recovered (observer.recovered) in a snapshot taken after `since` and
        every replica completed a request through the router that started after `since`; else None."""
        snap = self.observer.latest()
        if snap is None or snap.at < since or not recovered(snap):
            return None
        serving = {r.replica for r in self.traffic.snapshot() if r.outcome == COMPLETED and r.started >= since}
        return time.time() if serving >= set(self.replicas) else None

    def _router_url(self) -> str:
        if not getattr(self, "_router", None):
            self._router = self.observer.router_url()
        return self._router

    def replica_streaming(self, timeout_s: float = 30.0) -> tuple[str, int]:
        """A replica in the middle of a long stream (past its first token, under half of its tokens:
        waited for), and how many streams past their first token it has open."""

        def midway() -> tuple[str, int] | None:
            flights = [f for f in self.traffic.open_streams() if f.replica and f.tokens > 0]
            long = [f for f in flights if f.max_new_tokens >= self.traffic.long_tokens and f.tokens < f.max_new_tokens // 2]
            if not long:
                return None
            victim = long[0].replica
            return victim, sum(f.replica == victim for f in flights)

        found = self.wait(midway, timeout_s, "a long stream past its first token", quiet=True)
        return found if found else (self.replicas[1], 0)

    def restart_count(self, pod: str) -> int:
        return sum(c["restartCount"] for c in ((self.observer.pod(pod) or {}).get("status") or {}).get("containerStatuses") or [])

    def round_name(self, prefix: str) -> str:
        self._rounds_made += 1
        return f"{prefix}-{self._rounds_made}"

    def create_round(self, name: str, **spec: Any) -> None:
        body = {"apiVersion": "collm.io/v1alpha1", "kind": "AdapterRound", "metadata": {"name": name, "namespace": self.h.namespace}}
        self.h.apply({**body, "spec": {"clusterRef": {"name": NAME}, **spec}})

    def wait_round(self, name: str, timeout_s: float) -> RoundRecord | None:
        return self.wait(
            lambda: r if (r := self.observer.rounds.get(name)) is not None and r.succeeded is not None else None, timeout_s, f"round {name} to end"
        )

    def round_summary(self, name: str) -> str:
        rec = self.observer.rounds.get(name)
        if rec is None:
            return "not seen"
        if rec.succeeded is None:
            return "not finished"
        return f"{'Succeeded' if rec.succeeded else 'Failed'} ({rec.reason}): {rec.message}"[:400]

    def steps_for(self, participants: list[str], seconds: float) -> int:
        """Local steps that keep a round training about `seconds` at the participants' current pace."""
        first = {p: self.observer.stats(p) or {} for p in participants}
        time.sleep(3)
        now = {p: self.observer.stats(p) or {} for p in participants}
        rate = min((now[p].get("training_steps", 0) - first[p].get("training_steps", 0)) / 3 for p in participants)
        return max(now[p].get("unuploaded_steps", 0) for p in participants) + max(20, int(rate * seconds))

    def arm(self, pod: str, fault: str, **params: Any) -> None:
        arm(self.faults, pod, fault, **params)

    def disarm(self, pod: str, fault: str) -> None:
        (self.faults / pod / f"{fault}.json").unlink(missing_ok=True)

    def fault_file(self, pod: str, name: str) -> Path:
        return self.faults / pod / name

    def fired(self, pod: str, fault: str) -> dict:
        import json

        try:
            return json.loads(self.fault_file(pod, f"{fault}.fired").read_text())
        except (OSError, ValueError):
            return {}

    def router_metrics(self) -> str:
        with urllib.request.urlopen(self._router_url() + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    def router_gauge(self, metric: str, replica: str) -> float | None:
        try:
            text = self.router_metrics()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(metric + "{") and f'replica="{replica}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return None

    def router_counter(self, metric: str) -> float | None:
        try:
            text = self.router_metrics()
        except OSError:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric + "{") or line.startswith(metric + " "))

    # -- one scenario -----------------------------------------------------------------------------
    def run_scenario(self, name: str, window_start: float) -> Window:
        s = self.settings
        self.wait(lambda: self._steady(time.time() - 10), s.recovery_timeout_s, f"the steady state before {name}")
        before = serving_snapshot(self.observer.latest())
        retries = self.router_counter("collm_router_retries_total")
        try:
            injection = SCENARIOS[name](self)
        except Exception as exc:  # noqa: BLE001  a scenario that breaks is reported, the run goes on
            traceback.print_exc()
            injection = Injection(False, "the scenario raised", note=f"{type(exc).__name__}: {exc}")
        recovered_at = None
        if injection.injected:
            recovered_at = self.wait(lambda: self._steady(injection.cleared_at), s.recovery_timeout_s, f"the steady state after {name}")
        time.sleep(s.settle_s)
        split = self._final_disagreements()
        retries_after = self.router_counter("collm_router_retries_total")
        return Window(
            name,
            window_start,
            time.time(),
            injection,
            recovered_at,
            before,
            serving_snapshot(self.observer.latest()),
            None if retries is None or retries_after is None else retries_after - retries,
            split,
        )

    def _final_disagreements(self, patience_s: float = 15.0) -> list[str]:
        """Rule 4 of verdict.py after the settle time: asked again for `patience_s` (a round may be publishing)."""
        deadline, found = time.monotonic() + patience_s, ["no observation"]
        while time.monotonic() < deadline:
            snap = self.observer.latest()
            if snap is not None:
                globals_ = {r: _global(st) for r, st in snap.stats.items()}
                found = disagreements(globals_, snap.adapter)
                if not found:
                    return []
            time.sleep(1.0)
        return found


def _global(stats: dict | None) -> tuple[int, str] | None:
    g = (stats or {}).get("global_adapter") or {}
    return (int(g["cluster_version"]), g["sha256"]) if g.get("sha256") else None


def scenario_result(w: Window, records: list[RequestRecord], observer: Observer, *, last: bool = False) -> dict[str, Any]:
    """The figures of one scenario, from every request that ended and every observation in its
    window (the last window also takes the requests that ended while the traffic stopped)."""
    published, rounds, served, _ = observer.view()
    mine = [r for r in records if w.start <= r.ended and (last or r.ended < w.end)]
    seen = [s for s in served if w.start <= s.at < w.end]
    for r in mine:
        label = parse_label(r.adapter_version) if r.outcome == COMPLETED else None
        if label is not None:
            seen.append(Served(r.ended, r.replica, label[0], label[1], r.adapter_sha256, "response"))
    violations = half_applied(seen, published) + w.disagreements
    ended = [r for r in rounds if r.finished_seen is not None and w.start <= r.finished_seen < w.end]
    inj, t0 = w.injection, w.injection.fault_at
    figures = request_figures(mine)
    figures["not_completed"] = [
        {"started": round(r.started, 3), "s": round(r.ended - r.started, 2), "replica": r.replica, "outcome": r.outcome, "tokens": r.tokens, "detail": r.detail}
        for r in mine
        if r.outcome != COMPLETED
    ][:20]
    victim = inj.checks.get("victim")
    if inj.injected and victim:  # the requests the fault caught: on the victim when it struck (retried ones moved elsewhere)
        caught = [r for r in mine if r.replica == victim and r.started <= t0 <= r.ended]
        inj.checks["victim_requests_open_at_fault"] = {o: sum(r.outcome == o for r in caught) for o in sorted({r.outcome for r in caught})}
        during = [r for r in mine if r.replica == victim and t0 < r.started < inj.cleared_at]
        if during:  # sent to the victim while the fault lasted (the freeze)
            inj.checks["victim_requests_started_during_fault"] = {
                **{o: sum(r.outcome == o for r in during) for o in sorted({r.outcome for r in during})},
                "longest_s": round(max(r.ended - r.started for r in during), 2),
            }
    return {
        "scenario": w.scenario,
        "injected": inj.injected,
        "mechanism": inj.mechanism,
        "note": inj.note,
        "window_s": round(w.end - w.start, 1),
        "requests": figures,
        "router_retries": w.retries,
        "rounds": {
            "succeeded": sum(bool(r.succeeded) for r in ended),
            "failed": sum(r.succeeded is False for r in ended),
            "ended": [{"name": r.name, "result": "Succeeded" if r.succeeded else "Failed", "reason": r.reason, "message": r.message[:300]} for r in ended],
        },
        "versions": {"before": w.before, "after": w.after, "published_in_window": sorted({r.version for r in ended if r.succeeded and r.version is not None})},
        "half_applied": len(violations),
        "half_applied_details": violations,
        "recovery_s": {
            "first_completed_request": first_after([r.ended for r in records if r.outcome == COMPLETED and r.started >= t0], t0) if inj.injected else None,
            "first_succeeded_round": first_after([r.finished_seen for r in ended if r.succeeded and r.finished_seen], t0) if inj.injected else None,
            "steady_state": None if w.recovered_at is None else max(0.0, w.recovered_at - t0),
        },
        "recovered": w.recovered_at is not None,
        "checks": inj.checks,
        "as_expected": inj.checks.get("expected_met"),
        "passed": passed(inj.injected, figures["lost"], len(violations)),
    }


COLUMNS = [
    "scenario",
    "sent",
    "completed",
    "error event (after 1st token)",
    "refused",
    "lost",
    "rounds ok / failed",
    "half-applied",
    "recover: request / round / steady (s)",
    "as expected",
    "passed",
]


def table_rows(results: list[dict]) -> list[list]:
    rows = []
    for r in results:
        q, rec = r["requests"], r["recovery_s"]
        if not r["injected"]:
            rows.append([r["scenario"], "-", "-", "-", "-", "-", "-", "-", "not injected", "-", False])
            continue
        times = " / ".join("-" if rec[k] is None else f"{rec[k]:.1f}" for k in ("first_completed_request", "first_succeeded_round", "steady_state"))
        rows.append(
            [
                r["scenario"],
                q["sent"],
                q["completed"],
                f"{q['error_event']} ({q['error_events_after_first_token']})",
                q["refused"],
                q["lost"],
                f"{r['rounds']['succeeded']} / {r['rounds']['failed']}",
                r["half_applied"],
                times,
                r["as_expected"],
                r["passed"],
            ]
        )
    return rows


def run(settings: Settings, json_path: str | None = None) -> dict[str, Any]:
    from replica_agent.report import machine, print_table, write_json

    unknown = [s for s in settings.scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    chaos = Chaos(settings)
    load_start, started = os.getloadavg(), time.time()
    windows: list[Window] = []
    try:
        chaos.up()
        print(f"cluster up in {time.time() - started:.0f} s; scenarios: {', '.join(settings.scenarios)}", flush=True)
        for name in settings.scenarios:
            print(f"-- {name}", flush=True)
            windows.append(chaos.run_scenario(name, windows[-1].end if windows else chaos.traffic_started))
            print(f"   {windows[-1].injection.mechanism}", flush=True)
        chaos.traffic.stop()  # every request ends (or reaches its deadline) before the figures
        records = chaos.traffic.snapshot()
        results = [scenario_result(w, records, chaos.observer, last=w is windows[-1]) for w in windows]
    finally:
        chaos.down()
    for r in results:
        if r["scenario"] == "fill-data-volume" and not r["injected"]:
            r["note"] = r["note"] or chaos.fill_skip_reason
    out = {
        "benchmark": "chaos",
        "machine": {**machine(), "description": MACHINE, "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "settings": asdict(settings),
        "duration_s": round(time.time() - started, 1),
        "definitions": {
            "outcomes": "see e2e/chaos/traffic.py: completed, error_event, refused, lost",
            "half_applied": "see e2e/chaos/verdict.py (rules 1-4)",
            "passed": "fault injected, 0 requests lost, 0 half-applied versions",
        },
        "scenarios": results,
        "passed": bool(results) and all(r["passed"] for r in results),
    }
    print_table(f"Chaos on the dev cluster ({MACHINE})", COLUMNS, table_rows(results))
    for r in results:
        print(f"{r['scenario']}: {r['mechanism']}{' - ' + r['note'] if r['note'] else ''}")
        for ended in r["rounds"]["ended"]:
            if ended["result"] != "Succeeded":
                print(f"   round {ended['name']} failed ({ended['reason']}): {ended['message'][:200]}")
        for detail in r["half_applied_details"] + r["requests"]["lost_details"]:
            print(f"   ! {detail}")
        print(f"   checks: {r['checks']}")
    print(f"pods' logs and volumes: {chaos.root / 'devcluster' / 'kubelet'}")
    write_json(out, json_path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.chaos", description="inject faults into a dev cluster under traffic and rounds; figures per scenario")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run this scenario (repeatable; default: all, in this order)")
    p.add_argument("--freeze-seconds", type=float, default=Settings.freeze_s, help="how long cut-agent-off-network freezes the agent")
    p.add_argument("--concurrency", type=int, default=Settings.concurrency, help="streaming clients sending without pause")
    p.add_argument("--workdir", help="where the cluster keeps pods, logs and volumes (default: a temp dir)")
    args = p.parse_args(argv)
    settings = Settings(freeze_s=args.freeze_seconds, concurrency=args.concurrency, workdir=args.workdir)
    if args.scenario:
        settings.scenarios = args.scenario
    out = run(settings, args.json)
    return 0 if out["passed"] else 1
