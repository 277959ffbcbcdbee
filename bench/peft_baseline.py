"""The CoLLM paper's baseline (`collm bench goodput` policy `peft`): separate deployments on Hugging
Face transformers + peft, measured beside co-execution in the same run.

Half the replicas serve with transformers' `generate` on a peft model (static batching: the waiting
requests, up to `max_batch`, start together and the batch ends when its longest request does; new
arrivals wait for the next batch; tokens stream through a `BaseStreamer`). The other half train
the LoRA adapter with peft on their own data, full time. Every round interval the harness takes
each trainer's adapter, averages them (FedAvg, weighted by the samples trained since the last
global), publishes the result to the servers (between two batches) and restarts the trainers from
it: "adapters published at round end". Each replica is an OS process on its own core, as in the
other policies; the same router, load generator and scorer measure it.

Why our own server loop and not TGI: TGI is not installable here; this is the stack the paper's
baseline names (transformers + peft), driven the way a plain HTTP wrapper around `generate` is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import yaml
from aiohttp import web
from transformers.generation.streamers import BaseStreamer

from replica_agent.config import AgentConfig
from replica_agent.engine.adapter_store import adapter_sha256, version_label
from replica_agent.engine.data import LocalDataset
from replica_agent.engine.llama import model_dims
from replica_agent.engine.lora import LoraSpec, init_adapter
from replica_agent.engine.model_host import BaseModel, load_base_model, load_hf_model
from replica_agent.local.cluster import put_weights
from replica_agent.local.processes import ManagedProcess, core_sets, free_port, spawn, start_router
from replica_agent.local.quality import RequestScorer
from replica_agent.local.run import figures
from replica_agent.local.throttle import Throttle, throttle_all
from replica_agent.local.traffic import TrafficReplay


# -- the two processes ------------------------------------------------------------------------------
def _peft_model(config: AgentConfig):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.set_num_threads(1)
    model, tokenizer = load_hf_model(config.model)
    spec = LoraSpec(rank=config.lora_rank, alpha=config.lora_alpha, target_modules=tuple(config.lora_targets))
    peft_config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), lora_dropout=0.0)
    model = get_peft_model(model, peft_config)
    initial = init_adapter(spec, model_dims(model.config), seed=config.seed)  # the agents' "0.0"
    set_peft_model_state_dict(model, initial)
    return model, tokenizer, spec


class _RowStreamer(BaseStreamer):
    """Token ids of a whole batch, one step at a time, sent on to each row's callback."""

    def __init__(self, rows: list[_Pending], eos: set[int]) -> None:
        self.rows, self.eos, self.prompt_seen = rows, eos, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            row.token(token, token in self.eos)

    def end(self) -> None:
        for row in self.rows:
            row.finish()


@dataclass
class _Pending:
    prompt: str
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokenizer: object
    version: tuple[str, str] = ("", "")
    ids: list[int] = field(default_factory=list)
    done: bool = False

    def token(self, token: int, eos: bool) -> None:
        if self.done:
            return
        self.ids.append(token)
        last = eos or len(self.ids) >= self.max_new_tokens
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("token", token, last))
        if last:
            self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("final", text, self.version))


class PeftServer:
    def __init__(self, config: AgentConfig) -> None:
        self.model, self.tokenizer, self.spec = _peft_model(config)
        self.model.eval()
        self.max_batch = config.max_batch
        self.eos = set(self.model.config.eos_token_id if isinstance(self.model.config.eos_token_id, list) else [self.model.config.eos_token_id])
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        from peft import get_peft_model_state_dict

        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        self.version = (version_label(0, 0), adapter_sha256(state))
        self.waiting: queue.Queue[_Pending] = queue.Queue()
        self.lock = threading.Lock()  # held for a whole batch: a publish lands between two batches
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while True:
            rows = [self.waiting.get()]
            while len(rows) < self.max_batch:
                try:
                    rows.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            with self.lock, torch.no_grad():
                for row in rows:
                    row.version = self.version
                inputs = self.tokenizer([r.prompt for r in rows], return_tensors="pt", padding=True, padding_side="left")
                self.model.generate(
                    **inputs, max_new_tokens=max(r.max_new_tokens for r in rows), do_sample=False, pad_token_id=self.pad, streamer=_RowStreamer(rows, self.eos)
                )

    def publish(self, path: str, version: str) -> str:
        from peft import set_peft_model_state_dict

        tensors = safetensors.torch.load_file(path)
        sha = adapter_sha256(tensors)
        with self.lock:
            set_peft_model_state_dict(self.model, tensors)
            self.version = (version, sha)
        return sha

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        params = body.get("parameters") or {}
        row = _Pending(body["inputs"], int(params.get("max_new_tokens") or 20), asyncio.get_running_loop(), asyncio.Queue(), self.tokenizer)
        self.waiting.put(row)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        index = 0
        while True:
            kind, *rest = await row.events.get()
            if kind == "token":
                token, last = rest
                if not last:
                    await response.write(
                        b"data:"
                        + json.dumps({"index": index, "token": {"id": token, "text": "", "special": False}, "generated_text": None, "details": None}).encode()
                        + b"\n\n"
                    )
                index += 1
                continue
            text, (version, sha) = rest
            final = {
                "index": index,
                "token": {"id": row.ids[-1] if row.ids else 0, "text": "", "special": False},
                "generated_text": text,
                "details": None,
                "adapter_version": version,
                "adapter_sha256": sha,
            }
            await response.write(b"data:" + json.dumps(final).encode() + b"\n\n")
            break
        await response.write_eof()
        return response


class PeftTrainer:
    def __init__(self, config: AgentConfig) -> None:
        from peft import get_peft_model_state_dict

        self.model, self.tokenizer, self.spec = _peft_model(config)
        self.model.train()
        self.dataset = LocalDataset.from_path(config.data, self.tokenizer, seq_len=config.seq_len, eval_fraction=config.eval_fraction, seed=config.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.batches = self.dataset.train_batches(config.micro_batch, seed=config.seed)
        self.micro_batch = config.micro_batch
        self.lock = threading.Lock()
        self.steps = self.steps_since_global = self.tokens = 0
        self._state_dict = get_peft_model_state_dict
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        torch.set_num_threads(1)
        while True:
            batch = next(self.batches)
            with self.lock:
                loss = self.model(input_ids=batch.input_ids, labels=batch.labels).loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
                self.steps += 1
                self.steps_since_global += 1
                self.tokens += batch.tokens

    def snapshot(self, path: str) -> dict:
        with self.lock:
            tensors = {k: v.detach().clone().contiguous() for k, v in self._state_dict(self.model).items()}
            samples = self.steps_since_global * self.micro_batch
        safetensors.torch.save_file(tensors, path)
        return {"path": path, "samples": samples, "tokens": self.tokens}

    def adopt(self, path: str) -> None:
        from peft import set_peft_model_state_dict

        tensors = safetensors.torch.load_file(path)
        with self.lock:
            set_peft_model_state_dict(self.model, tensors)
            self.steps_since_global = 0


def _serve(role: str, config: AgentConfig, port: int) -> None:
    app = web.Application()
    if role == "serve":
        server = PeftServer(config)

        async def publish(request: web.Request) -> web.Response:
            body = await request.json()
            return web.json_response({"sha256": await asyncio.to_thread(server.publish, body["path"], body["version"])})

        app.add_routes(
            [
                web.post("/generate_stream", server.generate_stream),
                web.get("/health", lambda _: web.json_response({"status": "ok"})),
                web.put("/admin/adapter", publish),
            ]
        )
    else:
        trainer = PeftTrainer(config)

        async def snapshot(request: web.Request) -> web.Response:
            return web.json_response(await asyncio.to_thread(trainer.snapshot, (await request.json())["path"]))

        async def adopt(request: web.Request) -> web.Response:
            await asyncio.to_thread(trainer.adopt, (await request.json())["path"])
            return web.json_response({"ok": True})

        app.add_routes(
            [
                web.get("/health", lambda _: web.json_response({"status": "ok", "tokens": trainer.tokens})),
                web.post("/snapshot", snapshot),
                web.post("/adopt", adopt),
            ]
        )
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m collm_bench.peft_baseline", description="a transformers + peft server or trainer process of the `peft` baseline"
    )
    parser.add_argument("role", choices=["serve", "train"])
    parser.add_argument("--config", required=True, help="the replica's AgentConfig as YAML")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    _serve(args.role, AgentConfig(**yaml.safe_load(Path(args.config).read_text())), args.port)
    return 0


# -- the harness side -------------------------------------------------------------------------------
def _http(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    import urllib.request

    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read())


@dataclass
class _Process(ManagedProcess):
    url: str = ""


def _start(role: str, config: AgentConfig, logs: Path, cores: set[int]) -> _Process:
    port = free_port()
    path = logs / f"{config.replica_id}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    argv = [sys.executable, "-m", "collm_bench.peft_baseline", role, "--config", str(path), "--port", str(port)]
    managed = spawn(config.replica_id, argv, logs, cores, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return _Process(managed.name, managed.proc, managed.log_path, cores, f"http://127.0.0.1:{port}")


def _wait(process: _Process, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            _http("GET", process.url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{process.name} did not start within {timeout:.0f} s (log: {process.log_path})")


def run_peft(
    configs: list[AgentConfig],
    settings,
    workload,
    *,
    base: BaseModel | None = None,
    workdir: str | None = None,
    window_s: float = 5.0,
    drain_s: float = 120.0,
    throttle: Mapping[str, float] | None = None,
) -> dict:
    """One measured run of the `peft` baseline; the same figures as replica_agent.local.run.run_policy
    (`throttle`: replicas made slower devices, as there)."""
    base = base or load_base_model(configs[0].model)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="collm-peft-"))
    logs, archive = work / "logs", work / "archive"
    logs.mkdir(parents=True, exist_ok=True)
    archive.mkdir(parents=True, exist_ok=True)
    half = max(1, len(configs) // 2)
    trainers_cfg, servers_cfg = configs[:half], configs[half:] or configs[:1]
    cores = core_sets(len(trainers_cfg) + len(servers_cfg))
    processes: list[ManagedProcess] = []
    throttles: dict[str, Throttle] = {}
    rounds: list[dict] = []
    try:
        trainers = [_start("train", c, logs, cores[i]) for i, c in enumerate(trainers_cfg)]
        servers = [_start("serve", c, logs, cores[len(trainers) + i]) for i, c in enumerate(servers_cfg)]
        processes += trainers + servers
        for p in trainers + servers:
            _wait(p)
        throttles = throttle_all({p.name: p.pid for p in trainers + servers}, throttle)
        router = start_router({s.name: s.url for s in servers}, logs)
        processes.append(router)
        put_weights(router.url, {s.name: 1.0 for s in servers}, affinity=True)
        spec = LoraSpec(rank=configs[0].lora_rank, alpha=configs[0].lora_alpha, target_modules=tuple(configs[0].lora_targets))
        initial = init_adapter(spec, model_dims(base.config), seed=configs[0].seed)
        initial_sha = adapter_sha256(initial)
        safetensors.torch.save_file(initial, str(archive / f"{initial_sha}.safetensors"))
        cpu_start, harness_start = {p.name: p.cpu_seconds() for p in processes}, time.process_time()
        traffic = TrafficReplay(router.url, workload, settings.ttft_ms, settings.tpot_ms).start()
        duration = workload.arrivals[-1].at_s if workload.arrivals else 0.0
        state = {"global": initial, "version": 0}
        next_round = time.time() + settings.round_interval_s
        deadline = time.time() + duration + drain_s
        while not traffic.wait(1.0) and time.time() < deadline:
            if time.time() >= next_round and time.time() < traffic.started_at + duration * 0.75:
                rounds.append(_round(state, trainers, servers, archive, work))
                next_round = time.time() + settings.round_interval_s
        elapsed = time.time() - traffic.started_at
        tokens = [_http("GET", t.url + "/health")["tokens"] for t in trainers]
        cpu = {p.name: p.cpu_seconds() - cpu_start.get(p.name, 0.0) for p in processes}
        harness_cpu = time.process_time() - harness_start
    finally:
        for t in throttles.values():
            t.release()
        for p in reversed(processes):
            p.stop()
    scorer = RequestScorer(base, spec, [archive])
    try:
        result = figures(
            "peft", settings.ttft_ms, settings.tpot_ms, workload, list(traffic.records), traffic.sent, max(elapsed, duration), scorer, initial_sha, window_s
        )
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result.update(
        {
            "training_tokens": sum(tokens),
            "training_tokens_per_replica": {t.name: n for t, n in zip(trainers, tokens)},
            "revisions_per_replica": {p.name: 0 for p in trainers + servers},
            "served_at_end": {s.name: version_label(state["version"], 0) for s in servers},
            "rounds_started": len(rounds),
            "rounds_succeeded": len(rounds),
            "rounds": rounds,
            "allocations": [],
            "controller_errors": [],
            "cpu_seconds": {**cpu, "harness": harness_cpu},
            "samples": [],
            "roles": {"train": [t.name for t in trainers], "serve": [s.name for s in servers]},
            "throttled": {n: t.as_dict() for n, t in throttles.items()},
        }
    )
    return result


def _round(state: dict, trainers: list[_Process], servers: list[_Process], archive: Path, work: Path) -> dict:
    """FedAvg of the trainers' adapters, published to every server and adopted by every trainer."""
    started = time.time()
    snaps = [_http("POST", t.url + "/snapshot", {"path": str(work / f"{t.name}-snapshot.safetensors")}) for t in trainers]
    total = sum(max(1, s["samples"]) for s in snaps)
    g = state["global"]
    new = {k: v.clone() for k, v in g.items()}
    for snap in snaps:
        weight = max(1, snap["samples"]) / total
        tensors = safetensors.torch.load_file(snap["path"])
        for k in new:
            new[k] += weight * (tensors[k].to(new[k].dtype) - g[k])
    sha = adapter_sha256(new)
    path = archive / f"{sha}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in new.items()}, str(path))
    aggregated = time.time()
    state["version"] += 1
    label = version_label(state["version"], 0)
    for s in servers:
        _http("PUT", s.url + "/admin/adapter", {"path": str(path), "version": label})
    switched = time.time()
    for t in trainers:
        _http("POST", t.url + "/adopt", {"path": str(path)})
    state["global"] = new
    return {
        "number": state["version"],
        "started_at": started,
        "finished_at": time.time(),
        "result": "Succeeded",
        "version_sha256": sha,
        "freshness_s": switched - aggregated,
        "eval_loss_before": 0.0,
        "eval_loss_after": 0.0,
        "participants": [t.name for t in trainers],
    }


if __name__ == "__main__":
    sys.exit(main())
