"""Watches the dev cluster during a chaos run: what was published, how rounds ended, what each replica serves.

A thread polls every `interval_s`: the CollmCluster (current adapter, Ready) and every AdapterRound
straight from the emulator (no kubectl), and each agent's GET /stats (current and global adapter)
on its pod address. It keeps everything the verdict needs even after the operator prunes old
rounds: the versions published (version -> sha256), each round's end (result, reason, message,
times), and every adapter each replica was seen serving.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..harness import DevHarness, condition
from .verdict import Served

API_VERSION = "collm.io/v1alpha1"


@dataclass
class RoundRecord:
    name: str
    created: str
    started_at: float | None = None  # the driver's clock (unix seconds)
    finished_seen: float | None = None  # when this observer first saw it finished (unix, within interval_s)
    succeeded: bool | None = None
    reason: str = ""
    message: str = ""
    version: int | None = None
    sha256: str = ""
    aggregator: str = ""
    participants: list[dict] = field(default_factory=list)


@dataclass
class Snapshot:
    at: float
    ready: bool
    adapter: tuple[int, str] | None  # the CollmCluster's status.adapter (version, sha256)
    stats: dict[str, dict | None]  # replica -> its /stats (None: no answer)
    pods_ready: dict[str, bool]


class Observer:
    def __init__(self, h: DevHarness, cluster: str, replicas: list[str], interval_s: float = 1.0) -> None:
        self.h, self.cluster, self.replicas, self.interval_s = h, cluster, replicas, interval_s
        self.published: dict[int, set[str]] = {}
        self.rounds: dict[str, RoundRecord] = {}
        self.served: list[Served] = []
        self.snapshots: list[Snapshot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(replicas), thread_name_prefix="chaos-stats")

    # -- reading the cluster ----------------------------------------------------------------------
    def _objects(self) -> tuple[dict | None, list[dict], dict[str, dict]]:
        ns = self.h.namespace

        def read(emu) -> tuple[dict | None, list[dict], dict[str, dict]]:
            try:
                obj = emu.get_object(emu.rt_by_kind(API_VERSION, "CollmCluster"), ns, self.cluster)
            except Exception:  # noqa: BLE001  absent (ApiError) while it is created
                obj = None
            rounds = emu.list_objects(emu.rt_by_kind(API_VERSION, "AdapterRound"), ns)
            pods = {p["metadata"]["name"]: p for p in emu.list_objects(emu.rt_by_kind("v1", "Pod"), ns)}
            return copy.deepcopy((obj, rounds, pods))

        return self.h.dc.call(read)

    def cluster_object(self) -> dict | None:
        return self._objects()[0]

    def pod(self, name: str) -> dict | None:
        return self._objects()[2].get(name)

    def router_url(self) -> str:
        pods = self._objects()[2]
        for name, pod in pods.items():
            labels = pod["metadata"].get("labels") or {}
            if labels.get("app.kubernetes.io/component") == "router" and name.startswith(self.cluster):
                return f"http://{pod['status']['podIP']}:8080"
        raise LookupError(f"no router pod of {self.cluster}")

    def stats(self, replica: str, timeout_s: float = 2.0) -> dict | None:
        pod = self.pod(replica)
        ip = ((pod or {}).get("status") or {}).get("podIP")
        return _get_stats(ip, timeout_s) if ip else None

    # -- the polling thread -----------------------------------------------------------------------
    def start(self) -> Observer:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="chaos-observer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self._pool.shutdown(wait=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001  a poll that fails is retried; the run goes on
                print(f"observer: poll failed: {type(exc).__name__}: {exc}", flush=True)

    def poll(self) -> Snapshot:
        at = time.time()
        obj, rounds, pods = self._objects()
        ips = {r: ((pods.get(r) or {}).get("status") or {}).get("podIP") for r in self.replicas}
        stats = dict(zip(self.replicas, self._pool.map(lambda r: _get_stats(ips[r], 2.0) if ips[r] else None, self.replicas)))
        status = (obj or {}).get("status") or {}
        adapter = status.get("adapter") or {}
        current = (int(adapter.get("version") or 0), adapter["sha256"]) if adapter.get("sha256") else None
        snap = Snapshot(
            at=at,
            ready=condition(obj, "Ready").get("status") == "True",
            adapter=current,
            stats=stats,
            pods_ready={r: condition(pods.get(r), "Ready").get("status") == "True" for r in self.replicas},
        )
        with self._lock:
            if current is not None:
                self.published.setdefault(current[0], set()).add(current[1])
            for r in rounds:
                self._round(r, at)
            for replica, st in stats.items():
                if st is None:
                    continue
                for source, key in (("stats", "adapter"), ("global", "global_adapter")):
                    ref = st.get(key) or {}
                    if ref.get("sha256"):
                        self.served.append(Served(at, replica, int(ref["cluster_version"]), int(ref.get("revision") or 0), ref["sha256"], source))
            self.snapshots.append(snap)
        return snap

    def _round(self, obj: dict, at: float) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        rec = self.rounds.setdefault(meta["name"], RoundRecord(meta["name"], meta.get("creationTimestamp") or ""))
        state = status.get("state") or {}
        rec.started_at = state.get("startedAt") or rec.started_at
        rec.aggregator = status.get("aggregator") or rec.aggregator
        rec.participants = status.get("participants") or rec.participants
        summary = condition(obj, "Succeeded")
        if summary.get("status") in ("True", "False") and rec.succeeded is None:
            rec.succeeded = summary["status"] == "True"
            rec.reason, rec.message, rec.finished_seen = summary.get("reason") or "", summary.get("message") or "", at
            rec.version = status.get("version")
            rec.sha256 = status.get("sha256") or ""
            if rec.succeeded and rec.sha256:
                self.published.setdefault(int(rec.version or 0), set()).add(rec.sha256)

    # -- what the verdict reads -------------------------------------------------------------------
    def view(self) -> tuple[dict[int, set[str]], list[RoundRecord], list[Served], list[Snapshot]]:
        with self._lock:
            return ({k: set(v) for k, v in self.published.items()}, [copy.copy(r) for r in self.rounds.values()], list(self.served), list(self.snapshots))

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self.snapshots[-1] if self.snapshots else None


def _get_stats(ip: str, timeout_s: float) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:8080/stats", timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def recovered(snap: Snapshot) -> bool:
    """The steady state: Ready, every pod ready and answering, each resting on the cluster's adapter."""
    if not snap.ready or snap.adapter is None or not all(snap.pods_ready.values()):
        return False
    for st in snap.stats.values():
        g = (st or {}).get("global_adapter") or {}
        if g.get("sha256") != snap.adapter[1]:
            return False
    return True


def serving_snapshot(snap: Snapshot) -> dict[str, Any]:
    """Each replica's current adapter as "label (sha256 prefix)" and its global, for the report."""
    out: dict[str, Any] = {}
    for replica, st in snap.stats.items():
        if st is None:
            out[replica] = None
            continue
        a, g = st.get("adapter") or {}, st.get("global_adapter") or {}
        out[replica] = {"serves": f"{a.get('version')} ({str(a.get('sha256'))[:12]})", "global": f"{g.get('cluster_version')} ({str(g.get('sha256'))[:12]})"}
    return out
