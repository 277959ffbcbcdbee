"""`collm bench cloud-edge`: cloud-only, naive split, standalone edge and collaborative decoding
(docs/cloud-edge.md), as CE-CoLLM compares them, on this machine's emulated links.

Three processes: the cloud (a real agent: its engine serves POST /generate for cloud-only, its
gRPC port serves EdgeSession with mutual TLS), the edge (1 or N concurrent clients, one thread
each) and this one (link emulators, exit-head distillation, quality). Cloud and edge are each
pinned to a core of their own where the OS allows, with one intra-op thread, so that "edge
compute" and "cloud busy time" are what a device and a replica spend, not what they steal from
each other. Cloud busy time is the cloud process's CPU time during a run (its engine, gRPC, TLS
and session threads): work the replica cannot do for anyone else. Edge compute is the CPU time
of the edge's layers and exit head only. Communication is the time a client waits on the cloud
beyond the cloud's busy time (latency, transfer, framing, queueing), per client.

Modes:
- ``cloud-only``: the whole model on the replica, one POST /generate per prompt (its engine batches
  concurrent clients);
- ``naive``: every token goes to the cloud, and each request ships all the sequence's boundary
  states to a fresh session (no cloud cache), as CE-CoLLM's naive split does;
- ``standalone``: the exit head alone, nothing sent;
- ``collab@t``: collaborative decoding at threshold t (collab.generate over client.EdgeLink).

Quality is measured here, off the clock, on held-out text (another standard-library package than
the one the head is distilled on): token agreement of each mode's output with the whole model's
greedy output for the same prompts, and the held-out cross-entropy of the collaborative predictor
(the exit head's distribution where its confidence reaches the threshold, the whole model's
elsewhere) beside the whole model's.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from collm_bench.overhead import random_adapter
from collm_rpc import tls
from replica_agent.edge.client import CloudClient, EdgeLink, LinkSettings
from replica_agent.edge.collab import CloudLink, CloudSession, NoCloud, generate, state_bytes
from replica_agent.edge.exit_head import ExitHead, boundary_and_teacher, token_windows, train_exit_head
from replica_agent.edge.link import LinkConditions, LinkEmulator
from replica_agent.edge.split import EdgePartition, PinnedAdapter, edge_runtime, split_model
from replica_agent.engine.data import read_examples, stdlib_package_dir
from replica_agent.engine.llama import KVCache, LlamaRuntime
from replica_agent.engine.lora import LoraSpec
from replica_agent.engine.model_host import load_base_model
from replica_agent.report import machine, print_table, write_json

MODELS = ("tiny", "smollm2")
# One-way latency and bandwidth per direction: a round trip takes twice the latency.
LINKS = {"10ms-100Mbit": LinkConditions(0.010, 100e6 / 8), "50ms-10Mbit": LinkConditions(0.050, 10e6 / 8)}
THRESHOLDS = (0.5, 0.8, 0.9)  # 0.8: collm-edge's default
TRAIN_DATA, HELD_OUT_DATA = "json", "email"  # the replica's data; text the head never saw
PATIENT = LinkSettings(latency_budget_s=120.0, retry_s=0.0)  # every mode measured as designed: no token goes standalone for lateness
NS, CLUSTER, REPLICA = "bench", "edge", "cloud-0"


@dataclass(frozen=True)
class ModelSettings:
    head_steps: int
    head_batch: int
    head_seq_len: int
    prompt_len: int
    new_tokens: int
    prompts_per_client: int
    held_out_windows: int


SETTINGS = {
    "tiny": ModelSettings(head_steps=200, head_batch=4, head_seq_len=128, prompt_len=32, new_tokens=32, prompts_per_client=2, held_out_windows=16),
    "smollm2": ModelSettings(head_steps=50, head_batch=2, head_seq_len=64, prompt_len=32, new_tokens=24, prompts_per_client=1, held_out_windows=8),
}
QUICK = ModelSettings(head_steps=20, head_batch=2, head_seq_len=64, prompt_len=16, new_tokens=8, prompts_per_client=1, held_out_windows=4)


def _pin(core: int) -> None:
    """One core and one intra-op thread per process: a device and a replica, not a shared pool."""
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of a process (Linux /proc; clock ticks of 10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settle(wire: LinkEmulator, quiet_s: float = 0.3) -> None:
    """Wait until nothing has crossed `wire` for quiet_s, so that bytes still in flight (a run's last
    states, streams closing) are counted in the run that sent them, not the next one."""
    last = (-1, -1)
    while (now := (wire.bytes_up, wire.bytes_down)) != last:
        last = now
        time.sleep(quiet_s)


def _texts(package: str) -> list[str]:
    return [e.text if e.text is not None else f"{e.prompt}{e.completion}" for e in read_examples(stdlib_package_dir(package))]


# -- the cloud: a real agent ----------------------------------------------------------------------
def _cloud(model: str, clients: int, creds: tls.Credentials, adapter_path: str, conn: Connection) -> None:
    """An agent (engine started, no training) with a published non-zero adapter; its gRPC port with
    mutual TLS and its HTTP port go back on `conn`, and it serves until `conn` says stop."""
    _pin(0)
    import asyncio

    from replica_agent.agent import Agent
    from replica_agent.config import AgentConfig
    from replica_agent.serving.grpc_service import serve_grpc
    from replica_agent.serving.http_api import serve

    config = AgentConfig(
        model=model,
        replica_id=REPLICA,
        lora_rank=8,
        lora_alpha=16,
        train_cap_tokens=0,
        max_batch=max(clients, 1),
        max_total_tokens=256,
        engine_threads=1,
        adapter_retain=1,
        edge_max_sessions=64,  # naive split opens a session per token; closing ones may still be counted
        edge_max_kv_mb=4096,
    )
    agent = Agent(config, base=load_base_model(model))
    tensors = random_adapter(agent.spec, agent.runtime.dims, seed=1, dtype=agent.runtime.dtype)
    agent.store.publish(tensors, cluster_version=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, adapter_path)
    agent.start()
    server, _, grpc_port = serve_grpc(agent, "127.0.0.1", 0, workers=2 * clients + 8, credentials=creds)
    loop = asyncio.new_event_loop()
    runner = loop.run_until_complete(serve(agent, "127.0.0.1", 0))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    conn.send({"grpc_port": grpc_port, "http_port": runner.addresses[0][1], "spec": agent.spec, "pid": os.getpid()})
    conn.recv()
    server.stop(grace=0)
    agent.stop()


# -- the edge: N clients in one process -----------------------------------------------------------
class TimedEdge(EdgePartition):
    """The edge partition, adding up the CPU time of its layers and exit head (all client threads)."""

    compute_s = 0.0
    _lock = threading.Lock()

    def _timed(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        start = time.thread_time()
        out = fn(*args)
        with self._lock:
            self.compute_s += time.thread_time() - start
        return out

    def forward(self, ids: Sequence[int], start: int, cache: KVCache) -> torch.Tensor:
        return self._timed(super().forward, ids, start, cache)

    def exit_logits(self, boundary: torch.Tensor) -> torch.Tensor:
        return self._timed(super().exit_logits, boundary)


class NaiveLink(EdgeLink):
    """CE-CoLLM's naive split: nothing streams up between requests, and every request opens a fresh
    session and ships it every state of the sequence (EdgeLink's catch-up), so the cloud recomputes
    the deep layers over the whole context per token."""

    def receive(self, payload: bytes) -> None:
        self._states.append(payload)

    def request(self, payload: bytes) -> int | None:
        self.close()
        return super().request(payload)


class Waited:
    """A CloudLink that adds up the wall time its client spends in the cloud's calls."""

    def __init__(self, link: CloudLink) -> None:
        self.link, self.wait_s = link, 0.0

    def receive(self, payload: bytes) -> None:
        start = time.perf_counter()
        self.link.receive(payload)
        self.wait_s += time.perf_counter() - start

    def request(self, payload: bytes) -> int | None:
        start = time.perf_counter()
        try:
            return self.link.request(payload)
        finally:
            self.wait_s += time.perf_counter() - start


def _finish(link: EdgeLink) -> None:
    """End the link's stream and wait until the replica has ended it too: states still queued when
    the channel closes would be dropped unsent (and uncounted), e.g. after tokens that all exited."""
    session = link._session
    link.close()
    if session is not None:
        with session._cond:
            session._cond.wait_for(lambda: session.failure is not None, timeout=60)


def _client(job: dict, edge: TimedEdge, prompts: list[dict], out: dict, client: CloudClient) -> None:
    """One edge client's prompts, one after another; an exception goes back as `error`."""
    try:
        _prompts(job, edge, prompts, out, client)
    except Exception as exc:  # the run is void: say why in the parent
        out["error"] = repr(exc)
        raise


def _prompts(job: dict, edge: TimedEdge, prompts: list[dict], out: dict, client: CloudClient) -> None:
    mode, max_len = job["mode"], job["prompt_len"] + job["new_tokens"] + 1
    eos = set(job["eos"])
    out.update(tokens=[], edge_tokens=0, standalone=0, states=0, payload_bytes=0, wait_s=0.0, sessions=0)
    for p in prompts:
        if mode == "cloud-only":
            body = json.dumps({"inputs": p["text"], "parameters": {"max_new_tokens": job["new_tokens"], "details": True}}).encode()
            request = urllib.request.Request(f"http://{job['http']}/generate", body, {"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())
            out["wait_s"] += time.perf_counter() - start
            out["tokens"].append([t["id"] for t in answer["details"]["tokens"]])
            continue
        threshold = job["threshold"] if mode.startswith("collab") else 2.0  # naive: every token up; standalone: every token the head's
        inner = NoCloud() if mode == "standalone" else (NaiveLink if mode == "naive" else EdgeLink)(client, max_len)
        link = Waited(inner)
        result = generate(edge, link, p["ids"], max_new_tokens=job["new_tokens"], threshold=threshold, until=eos.__contains__)
        if isinstance(inner, EdgeLink):
            _finish(inner)
            out["sessions"] += inner.stats.sessions
            out["payload_bytes"] += inner.stats.bytes_sent
            out["states"] += inner.stats.states_sent
        out["tokens"].append(result.tokens)
        out["edge_tokens"] += len(result.tokens) - result.cloud_tokens
        out["standalone"] += result.standalone_tokens
        out["wait_s"] += link.wait_s


def _edge(model: str, split: int, adapter_path: str, spec: LoraSpec, head_path: str, conn: Connection) -> None:
    """Runs the jobs `conn` sends (one mode, link and client count each) until it sends None."""
    _pin(1)
    base = load_base_model(model)
    adapter = PinnedAdapter.of(load_file(adapter_path), spec)
    head = ExitHead.load(head_path, adapter_sha256=adapter.sha256)
    edge = TimedEdge(edge_runtime(base, split), split, adapter, head)
    clients: list[CloudClient] = []  # one channel per client, kept across runs as a device keeps its connection
    while (job := conn.recv()) is not None:
        while len(clients) < len(job["prompts"]):
            c = CloudClient(job["grpc"], model=model, split=split, adapter_sha256=adapter.sha256, credentials=job["creds"], settings=PATIENT)
            clients.append(c)
        outs: list[dict] = [{} for _ in job["prompts"]]
        threads = [threading.Thread(target=_client, args=(job, edge, ps, out, c)) for ps, out, c in zip(job["prompts"], outs, clients)]
        edge.compute_s = 0.0
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send({"total_s": time.perf_counter() - start, "edge_compute_s": edge.compute_s, "clients": outs})
    for c in clients:
        c.close()


# -- this process: quality, links, the table ------------------------------------------------------
def _held_out(tokenizer, bos: int | None, settings: ModelSettings, prompts: int) -> tuple[torch.Tensor, list[dict]]:
    """Cross-entropy windows and prompts, both from text the head never saw (disjoint token ranges)."""
    from replica_agent.serving.schemas import prompt_ids

    windows = token_windows(tokenizer, _texts(HELD_OUT_DATA), 128)
    ce, rest = windows[: settings.held_out_windows], windows[settings.held_out_windows :]
    out = []
    for row in rest[:prompts]:
        text = tokenizer.decode(row[: settings.prompt_len].tolist(), skip_special_tokens=True)
        out.append({"text": text, "ids": prompt_ids(tokenizer.encode(text), None, bos)})  # as the agent's POST /generate encodes it
    return ce, out


@torch.no_grad()
def _cross_entropy(runtime: LlamaRuntime, adapter: PinnedAdapter, head: ExitHead, windows: torch.Tensor, thresholds: Sequence[float]) -> dict:
    """Held-out cross-entropy (nats/token) of the whole model, of the exit head, and of the
    collaborative predictor at each threshold, with the share of positions that exit."""
    lora = adapter.lora(runtime)
    whole, exit_, conf, targets = [], [], [], []
    for batch in windows.split(2):
        boundary, teacher = boundary_and_teacher(runtime, lora, head.split, batch)
        head_logp = F.log_softmax(head.logits(runtime, boundary)[:, :-1].float(), -1)
        whole.append(F.log_softmax(teacher[:, :-1].float(), -1).gather(-1, batch[:, 1:, None]).flatten())
        exit_.append(head_logp.gather(-1, batch[:, 1:, None]).flatten())
        conf.append(head_logp.exp().amax(-1).flatten())
        targets.append(batch[:, 1:].flatten())
    w, e, c = torch.cat(whole), torch.cat(exit_), torch.cat(conf)
    out = {"whole": float(-w.mean()), "exit_head": float(-e.mean()), "tokens": int(w.numel())}
    for t in thresholds:
        out[f"collab@{t}"] = float(-torch.where(c >= t, e, w).mean())
        out[f"exit_share@{t}"] = float((c >= t).float().mean())
    return out


def _agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the whole model's greedy tokens that a mode reproduced at the same position."""
    same = sum(a == b for out, ref in zip(tokens, reference) for a, b in zip(out, ref))
    return same / sum(len(ref) for ref in reference)


def _modes(thresholds: Sequence[float]) -> list[tuple[str, float | None]]:
    return [("cloud-only", None), ("naive", None), ("standalone", None), *((f"collab@{t}", t) for t in thresholds)]


def run_model(
    model: str,
    *,
    links: Sequence[str],
    clients: Sequence[int],
    thresholds: Sequence[float],
    settings: ModelSettings,
    workdir: str,
) -> dict:
    ca = tls.CertificateAuthority.create()
    ctx = mp.get_context("spawn")
    cloud_conn, cloud_end = ctx.Pipe()
    adapter_path, head_path = f"{workdir}/{model}-adapter.safetensors", f"{workdir}/{model}-head.safetensors"
    replica_creds = ca.issue(tls.Identity.replica(NS, CLUSTER, REPLICA))
    cloud = ctx.Process(target=_cloud, args=(model, max(clients), replica_creds, adapter_path, cloud_end), daemon=True)
    cloud.start()
    base = load_base_model(model)
    runtime = LlamaRuntime(base.config, base.state_dict)
    split = runtime.dims.layers // 2
    ports = cloud_conn.recv()
    adapter = PinnedAdapter.of(load_file(adapter_path), ports["spec"])
    idle_before = _cpu_seconds(ports["pid"])
    start = time.perf_counter()
    head = train_exit_head(
        runtime,
        adapter,
        _texts(TRAIN_DATA),
        settings.head_steps,
        tokenizer=base.tokenizer,
        split=split,
        batch_size=settings.head_batch,
        seq_len=settings.head_seq_len,
    )
    head_s = time.perf_counter() - start
    idle_cpu_per_s = (_cpu_seconds(ports["pid"]) - idle_before) / head_s  # the idle cloud's own CPU use (engine loop, gRPC)
    head.save(head_path)
    ce_windows, prompts = _held_out(base.tokenizer, base.bos_token_id, settings, max(clients) * settings.prompts_per_client)
    quality = _cross_entropy(runtime, adapter, head, ce_windows, thresholds)
    edge_ref, cloud_ref = split_model(runtime, adapter, split, head)
    eos = set(base.eos_token_ids)
    reference = [
        generate(
            edge_ref,
            CloudSession(cloud_ref, adapter.sha256, max_len=len(p["ids"]) + settings.new_tokens + 1),
            p["ids"],
            max_new_tokens=settings.new_tokens,
            threshold=2.0,
            state_dtype="fp32",
            until=eos.__contains__,
        ).tokens
        for p in prompts
    ]
    edge_conn, edge_end = ctx.Pipe()
    edge = ctx.Process(target=_edge, args=(model, split, adapter_path, ports["spec"], head_path, edge_end), daemon=True)
    edge.start()
    grpc_wire = LinkEmulator(f"127.0.0.1:{ports['grpc_port']}").start()
    http_wire = LinkEmulator(f"127.0.0.1:{ports['http_port']}").start()
    state = state_bytes(runtime.dims.hidden, "fp16")
    rows: list[dict] = []

    def job(mode: str, threshold: float | None, per_client: list[list[dict]], new_tokens: int) -> dict:
        return {
            "mode": mode,
            "model": model,
            "threshold": threshold,
            "prompts": per_client,
            "prompt_len": max(len(p["ids"]) for p in prompts),
            "new_tokens": new_tokens,
            "eos": sorted(eos),
            "grpc": grpc_wire.address,
            "http": http_wire.address,
            "creds": ca.issue(tls.Identity.edge(NS, CLUSTER, "edge-1")),
        }

    try:
        for mode in ("cloud-only", "collab@2.0"):  # warm-up, not measured: first calls allocate, connect (TLS) and load lazily
            edge_conn.send(job(mode, 2.0, [prompts[:1]] * max(clients), 4))
            edge_conn.recv()
        for n in clients:
            per_client = [prompts[i * settings.prompts_per_client : (i + 1) * settings.prompts_per_client] for i in range(n)]
            for link in links:
                for wire in (grpc_wire, http_wire):
                    wire.set(LINKS[link])
                for mode, threshold in _modes(thresholds):
                    if mode == "standalone" and link != links[0]:
                        continue  # nothing crosses a link: one run per client count
                    wire = http_wire if mode == "cloud-only" else grpc_wire
                    _settle(wire)
                    up, down, cpu = wire.bytes_up, wire.bytes_down, _cpu_seconds(ports["pid"])
                    edge_conn.send(job(mode, threshold, per_client, settings.new_tokens))
                    out = edge_conn.recv()
                    if errors := [c["error"] for c in out["clients"] if "error" in c]:
                        raise RuntimeError(f"{model} {mode} over {link} with {n} clients failed: {errors[0]}")
                    _settle(wire)
                    cloud_busy = _cpu_seconds(ports["pid"]) - cpu  # includes the settling: the idle cloud spends ~0 (cloud_idle_cpu_per_s)
                    row = _row(mode, threshold, out, cloud_busy, wire.bytes_up - up, wire.bytes_down - down)
                    # per_client holds contiguous slices of the prompts: flattened, they are the first n x prompts_per_client
                    row |= {"model": model, "link": "-" if mode == "standalone" else link, "clients": n, "state_bytes": state}
                    row["agreement"] = _agreement([t for c in out["clients"] for t in c["tokens"]], reference[: n * settings.prompts_per_client])
                    row["cross_entropy"] = quality["exit_head"] if mode == "standalone" else quality.get(mode, quality["whole"])
                    rows.append(row)
    finally:
        edge_conn.send(None)
        edge.join(timeout=30)
        cloud_conn.send("stop")
        cloud.join(timeout=30)
        grpc_wire.stop()
        http_wire.stop()
    _compare(rows)
    return {
        "model": model,
        "layers": runtime.dims.layers,
        "split": split,
        "hidden": runtime.dims.hidden,
        "state_bytes_fp16": state,
        "head": {
            "steps": settings.head_steps,
            "batch": settings.head_batch,
            "seq_len": settings.head_seq_len,
            "train_s": head_s,
            "temperature": head.temperature,
        },
        "cloud_idle_cpu_per_s": idle_cpu_per_s,
        "quality": quality,
        "settings": settings.__dict__,
        "rows": rows,
    }


def _row(mode: str, threshold: float | None, out: dict, cloud_busy: float, wire_up: int, wire_down: int) -> dict:
    clients = out["clients"]
    tokens = sum(len(t) for c in clients for t in c["tokens"])
    states = sum(c["states"] for c in clients)
    wait = sum(c["wait_s"] for c in clients) / len(clients)
    return {
        "mode": mode,
        "threshold": threshold,
        "tokens": tokens,
        "total_s": out["total_s"],
        "edge_compute_s": out["edge_compute_s"],
        "cloud_busy_s": cloud_busy,
        "wait_s": wait,  # per client: wall time blocked on the cloud
        "communication_s": max(0.0, wait - cloud_busy / len(clients)),
        "states_sent": states,
        "payload_bytes": sum(c["payload_bytes"] for c in clients),
        "wire_bytes_up": wire_up,
        "wire_bytes_down": wire_down,
        "bytes_per_token": wire_up / tokens,
        "payload_bytes_per_state": sum(c["payload_bytes"] for c in clients) / states if states else 0.0,
        "wire_bytes_per_state": wire_up / states if states else 0.0,
        "edge_share": sum(c["edge_tokens"] for c in clients) / tokens if mode != "cloud-only" else 0.0,
        "standalone_tokens": sum(c["standalone"] for c in clients),
        "sessions": sum(c["sessions"] for c in clients),
    }


def _compare(rows: list[dict]) -> None:
    """Each row against cloud-only on the same link and client count: total time and cloud busy
    time saved (standalone, on no link, against the mean of the links' cloud-only runs)."""
    for row in rows:
        base = [r for r in rows if r["mode"] == "cloud-only" and r["clients"] == row["clients"] and row["link"] in ("-", r["link"])]
        total = sum(r["total_s"] for r in base) / len(base)
        busy = sum(r["cloud_busy_s"] for r in base) / len(base)
        row["time_saved"] = 1 - row["total_s"] / total
        row["cloud_busy_saved"] = 1 - row["cloud_busy_s"] / busy if busy > 0 else 0.0


COLUMNS = [
    "model",
    "link",
    "clients",
    "mode",
    "tokens",
    "total s",
    "saved",
    "edge s",
    "cloud s",
    "cloud saved",
    "comm s",
    "B/token",
    "edge share",
    "agree",
    "CE",
]


def _table_row(r: dict) -> list:
    return [
        r["model"],
        r["link"],
        r["clients"],
        r["mode"],
        r["tokens"],
        r["total_s"],
        f"{100 * r['time_saved']:.1f}%",
        r["edge_compute_s"],
        r["cloud_busy_s"],
        f"{100 * r['cloud_busy_saved']:.1f}%",
        r["communication_s"],
        f"{r['bytes_per_token']:,.0f}",
        r["edge_share"],
        r["agreement"],
        r["cross_entropy"],
    ]


def run(
    models: Sequence[str] = MODELS,
    *,
    links: Sequence[str] = tuple(LINKS),
    clients: Sequence[int] = (1, 8),
    thresholds: Sequence[float] = THRESHOLDS,
    quick: bool = False,
    json_path: str | None = None,
) -> dict:
    """Every model's modes over every link and client count; `quick`: the short settings for a test."""
    for name in (*models, *links):
        if name not in (*MODELS, *LINKS):
            raise ValueError(f"unknown model or link {name!r}: models {MODELS}, links {tuple(LINKS)}")
    result: dict = {"machine": machine(), "links": {k: v.__dict__ for k, v in LINKS.items() if k in links}, "models": []}
    with tempfile.TemporaryDirectory(prefix="collm-bench-cloud-edge-") as workdir:
        for model in models:
            figures = run_model(model, links=links, clients=clients, thresholds=thresholds, settings=QUICK if quick else SETTINGS[model], workdir=workdir)
            result["models"].append(figures)
            q, h = figures["quality"], figures["head"]
            print(
                f"{model}: split {figures['split']}/{figures['layers']}, fp16 state {figures['state_bytes_fp16']} B, exit head {h['steps']} steps in "
                f"{h['train_s']:.1f} s; held-out CE whole {q['whole']:.3f}, exit head {q['exit_head']:.3f} nats/token; "
                f"idle cloud CPU {figures['cloud_idle_cpu_per_s']:.3f} s/s"
            )
    rows = [r for m in result["models"] for r in m["rows"]]
    print_table("cloud-edge collaborative inference", COLUMNS, [_table_row(r) for r in rows])
    write_json(result, json_path)
    return result
