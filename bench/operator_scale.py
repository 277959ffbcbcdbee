"""`collm bench operator-scale`: one operator, many CollmClusters, on the emulated API server.

The real operator (kopf, as `kopf run`) drives `--clusters` CollmClusters of two replicas each. The
emulated kubelet runs in stand-in mode: pods get loopback addresses and turn Ready, but no agent
process starts; one stand-in gRPC server (mutual TLS, with a replica certificate from the operator's
own CA) answers every pod's address on port 9090 with the stats of an idle replica and acknowledges
plans. It runs in a process of its own, as agents do: in the bench's process, which also runs the
emulated API server, its answers waited for that process's interpreter, and the operator's steps
with them (up to 130 ms at 50 clusters). So what is measured is the operator: reconciles, its
watches, control steps (gRPC stats and plans, status writes), its memory, threads and CPU, and the
calls it makes to the API server.

Figures: time from creating a cluster to its first reconcile (status.observedGeneration), p50/p99
of the control step in the steady phase (the operator's histogram there, interpolated within
buckets), the operator's resident memory and threads at the end of the steady phase, its CPU over
it (% of one core), API requests per minute over it, and the machine's load average at its end (a
step's wall time includes waiting for a core: on a shared machine, others' jobs show there).
Runs from a clone (the emulator lives in e2e/devcluster).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from collm_control.stats import AgentStats
from collm_rpc import tls
from collm_rpc.proto import collm_pb2 as pb
from collm_rpc.proto import collm_pb2_grpc as pb_grpc
from collm_rpc.stats import to_proto
from replica_agent.local.processes import free_port

GRPC_PORT = 9090  # the agents' port (collm_operator.api.GRPC_PORT): every pod address is dialled there


class StandInAgent(pb_grpc.AgentServicer):
    """An idle replica for every address: stats without load, data or adapter; plans acknowledged."""

    def __init__(self) -> None:
        self.stats_calls = self.plans = 0

    def GetStats(self, request, context):
        self.stats_calls += 1
        return to_proto(AgentStats(replica_id="stand-in", model="tiny"))

    def ApplyPlan(self, request, context):
        self.plans += 1
        return pb.Ack(ok=True)


def serve_stand_in(folder: str) -> None:
    """The stand-in agent's process: serves with the credentials in `folder` until SIGTERM, then
    writes its call counts to `folder`/calls.json. Exits 3 when port 9090 is taken."""
    d = Path(folder)
    creds = tls.Credentials((d / "ca.crt").read_bytes(), (d / "tls.crt").read_bytes(), (d / "tls.key").read_bytes())
    agent = StandInAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_AgentServicer_to_server(agent, server)
    if not server.add_secure_port(f"0.0.0.0:{GRPC_PORT}", tls.server_credentials(creds)):
        sys.exit(3)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print("serving", flush=True)
    stop.wait()
    server.stop(grace=1)
    (d / "calls.json").write_text(json.dumps({"stats_calls": agent.stats_calls, "plans": agent.plans}))


def _start_stand_in(folder: Path, creds: tls.Credentials) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    for name, pem in (("ca.crt", creds.ca), ("tls.crt", creds.cert), ("tls.key", creds.key)):
        (folder / name).write_bytes(pem)
    proc = subprocess.Popen([sys.executable, "-m", "collm_bench.operator_scale", str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "serving":
        proc.wait(10)
        if proc.returncode == 3:
            raise RuntimeError(f"port {GRPC_PORT} is taken: the stand-in agents need it (stop what listens there)")
        raise RuntimeError(f"the stand-in agent did not start (exit status {proc.returncode})")
    return proc


def _stop_stand_in(proc: subprocess.Popen, folder: Path) -> dict[str, int]:
    proc.terminate()
    proc.wait(10)
    calls = folder / "calls.json"
    return json.loads(calls.read_text()) if calls.exists() else {"stats_calls": 0, "plans": 0}


def _cluster(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "collm.io/v1alpha1",
        "kind": "CollmCluster",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": {"source": "tiny"}, "replicas": 2, "federation": {"enabled": False}, "scheduling": {"slowIntervalSeconds": 10}},
    }


def _proc_status(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    # utime and stime, fields 14 and 15 of /proc/<pid>/stat (after the command's closing parenthesis).
    ticks = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[11:13]
    cpu_s = sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")
    return {"rss_mib": fields.get("VmRSS", 0) // 1024, "threads": fields.get("Threads", 0), "cpu_s": cpu_s}


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds rank q."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _control_steps(metrics_url: str) -> tuple[int, list[tuple[float, float]]]:
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    buckets, count = [], 0
    for family in text_string_to_metric_families(text):
        if family.name == "collm_operator_control_step_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    buckets.append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    count = int(s.value)
    return count, buckets


def run(clusters: int = 100, steady_s: float = 60.0, json_path: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(Path.cwd()))  # the emulator is in the clone, not in the installed packages
    try:
        from e2e.devcluster.cluster import DevCluster
    except ImportError:
        raise SystemExit("collm bench operator-scale runs the emulated cluster of a clone: run it from the repository root") from None
    from kubernetes import config

    from collm_operator.certificates import CA_SECRET
    from collm_operator.kube import Kube
    from replica_agent.report import machine, print_table, write_json  # torch: not in the stand-in agent's process

    metrics_port = free_port()
    os.environ["COLLM_OPERATOR_METRICS_PORT"] = str(metrics_port)
    root = Path(workdir or tempfile.mkdtemp(prefix="collm-operator-scale-"))
    dc = DevCluster(workdir=root, operator=False, stand_in=True).start()
    stand_in = None
    try:
        kube = Kube(config.new_client_from_config(str(dc.kubeconfig)))
        assert dc.start_operator(), "the operator module was not found"
        deadline = time.monotonic() + 60
        while (ca_secret := kube.get("v1", "Secret", "default", CA_SECRET)) is None:
            if time.monotonic() > deadline or (dc.operator_proc is not None and dc.operator_proc.poll() is not None):
                raise RuntimeError(f"the operator did not start (see {dc.operator_log})")
            time.sleep(0.5)
        data = {k: base64.b64decode(v) for k, v in ca_secret["data"].items()}
        creds = tls.CertificateAuthority(data["tls.crt"], data["tls.key"]).issue(tls.Identity.replica("default", "stand-in", "stand-in"))
        stand_in = _start_stand_in(root / "stand-in", creds)

        created: dict[str, float] = {}
        for i in range(clusters):
            name = f"scale-{i:03d}"
            kube.create(_cluster(name))
            created[name] = time.monotonic()
        reconciled: dict[str, float] = {}
        ready: dict[str, float] = {}
        deadline = time.monotonic() + max(120.0, clusters * 2.0)
        while len(ready) < clusters and time.monotonic() < deadline:
            for obj in kube.list("collm.io/v1alpha1", "CollmCluster", "default"):
                name, status, now = obj["metadata"]["name"], obj.get("status") or {}, time.monotonic()
                if name not in reconciled and status.get("observedGeneration"):
                    reconciled[name] = now - created[name]
                if name not in ready and int(status.get("readyReplicas") or 0) == 2:
                    ready[name] = now - created[name]
            time.sleep(0.5)
        if len(ready) < clusters:
            raise RuntimeError(f"only {len(ready)} of {clusters} clusters reached 2 ready replicas (see {dc.operator_log})")

        pid = dc.operator_proc.pid if dc.operator_proc is not None else 0
        steps_before, buckets_before = _control_steps(f"http://127.0.0.1:{metrics_port}/metrics")
        calls_before, started = dc.emulator.requests_served if dc.emulator is not None else 0, time.monotonic()
        samples, api_ms = [_proc_status(pid)], []
        selector = "app.kubernetes.io/instance=scale-000,app.kubernetes.io/component=agent"
        while time.monotonic() - started < steady_s:
            time.sleep(min(5.0, steady_s))
            samples.append(_proc_status(pid))
            for _ in range(5):  # what one of the operator's reads costs the emulated API server now
                t0 = time.perf_counter()
                kube.list("v1", "Pod", "default", selector)
                api_ms.append((time.perf_counter() - t0) * 1000)
        elapsed = time.monotonic() - started
        load_1min = os.getloadavg()[0]
        calls = (dc.emulator.requests_served if dc.emulator is not None else 0) - calls_before
        steps, buckets = _control_steps(f"http://127.0.0.1:{metrics_port}/metrics")
        # The steady phase only: the start-up burst (every cluster's first steps at once) is left out.
        earlier = dict(buckets_before)
        steady = [(le, count - earlier.get(le, 0.0)) for le, count in buckets]
        p50, p99 = histogram_quantile(steady, 0.5), histogram_quantile(steady, 0.99)
        result = {
            "clusters": clusters,
            "replicas_per_cluster": 2,
            "steady_seconds": round(elapsed, 1),
            "first_reconcile_s": {"p50": statistics.median(reconciled.values()), "max": max(reconciled.values())},
            "ready_s": {"p50": statistics.median(ready.values()), "max": max(ready.values())},
            "control_steps": steps,
            "control_steps_in_steady_phase": steps - steps_before,
            "control_step_ms": {"p50": None if p50 is None else p50 * 1000, "p99": None if p99 is None else p99 * 1000},
            "operator": {
                "rss_mib": samples[-1]["rss_mib"],
                "rss_mib_first": samples[0]["rss_mib"],
                "threads": samples[-1]["threads"],
                # CPU the operator used over the steady phase, in % of one core: what the steps cost,
                # whatever else the machine runs (the step times include waiting for a core).
                "cpu_percent": (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / elapsed * 100,
            },
            "api_requests_per_minute": calls / elapsed * 60,
            "api_pod_list_ms": {"p50": statistics.median(api_ms), "max": max(api_ms)},
            "stand_in": _stop_stand_in(stand_in, root / "stand-in"),
            "machine": machine(),
            "load_average_1min": load_1min,  # the machine's, at the end of the steady phase (others' jobs show here)
        }
    finally:
        if stand_in is not None and stand_in.poll() is None:
            stand_in.kill()
        dc.stop()
    print_table(
        f"One operator, {clusters} CollmClusters x 2 stand-in replicas, {result['steady_seconds']} s steady",
        ["figure", "value"],
        [
            ["first reconcile after create, p50 / max (s)", f"{result['first_reconcile_s']['p50']:.2f} / {result['first_reconcile_s']['max']:.2f}"],
            ["2 replicas ready after create, p50 / max (s)", f"{result['ready_s']['p50']:.2f} / {result['ready_s']['max']:.2f}"],
            ["control step p50 / p99 (ms)", f"{result['control_step_ms']['p50']:.1f} / {result['control_step_ms']['p99']:.1f}"],
            ["control steps in the steady phase", result["control_steps_in_steady_phase"]],
            ["operator resident memory (MiB)", result["operator"]["rss_mib"]],
            ["operator threads", result["operator"]["threads"]],
            ["operator CPU over the steady phase (% of one core)", f"{result['operator']['cpu_percent']:.1f}"],
            ["API requests per minute", f"{result['api_requests_per_minute']:.0f}"],
            ["one pod list on the emulated API, p50 / max (ms)", f"{result['api_pod_list_ms']['p50']:.1f} / {result['api_pod_list_ms']['max']:.1f}"],
            [f"machine load average, 1 min ({result['machine']['cores_usable']} cores)", f"{load_1min:.2f}"],
        ],
    )
    write_json(result, json_path)
    return result


if __name__ == "__main__":  # the stand-in agent's process (see _start_stand_in)
    serve_stand_in(sys.argv[1])
