"""`collm bench soak`: a local cluster under steady load for N minutes, watched for leaks.

The local mode's machinery as `collm bench goodput` uses it (replica_agent/local): replica agent
processes on CPU cores of their own (the tiny model by default), the router process, and the local
controller, which plans every few seconds and starts a federated round every `round_every_s`. A
slice of an Azure trace (its bursts and gaps, at a mean rate of `rate` req/s) streams through the
router over HTTP for the whole run.

Every `sample_every_s` each agent process and the router are sampled with psutil: resident
memory, threads, open descriptors (num_fds: files, sockets, pipes) and open regular files; each
agent's /metrics gives its engine's KV-cache rows in use. The agent exports no gauge named after
the KV cache: the cache is allocated once with `max_batch` rows, one per running request, so rows
in use are `collm_running_requests` and the total is the replica's `max_batch` setting. The LoRA
slab's slots in use are `collm_live_adapter_versions` (of `lora_slots`).

The figures and the verdict (soak_verdict.py): per process, the memory slope in MB per hour after
the warm-up and the growth of threads and descriptors; requests sent, answered and failed; rounds
started and succeeded; KV rows in use when idle before the load and once it has drained (every row
freed). The issue's target: memory slope under 20 MB per hour after warm-up, no thread or file
growth, no failed request.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from collm_bench.soak_verdict import SAMPLE_FIELDS, ProcessSample, Targets, memory_slope_mb_per_hour, overall, process_figures
from replica_agent.engine.model_host import load_base_model
from replica_agent.local.cluster import LocalDeployment, replica_configs
from replica_agent.local.controller import ControllerSettings
from replica_agent.local.processes import ManagedProcess
from replica_agent.local.traffic import TrafficReplay, trace_slice
from replica_agent.local.workload import workload_for
from replica_agent.report import machine, print_table, write_json

WARMUP_SHARE = 0.2  # of the run, when no warm-up is given
# The agent's gauges read at every sample (serving/metrics.py), under the names the report uses.
ENGINE_GAUGES = {
    "collm_running_requests": "kv_rows_in_use",
    "collm_queue_depth": "queue",
    "collm_live_adapter_versions": "adapter_slots_in_use",
    "collm_pinned_requests": "pinned_requests",
}
# The process's malloc heap by state (replica_agent/memory.py): what is allocated and what the
# allocator keeps free. Their slopes tell a leak (in use grows) from fragmentation (free grows).
HEAP_GAUGE = "collm_process_heap_bytes"
# The longest of the agent's periodic malloc_trim calls (memory.Trimmer): what handing pages back costs.
TRIM_GAUGE = "collm_process_heap_trim_longest_seconds"
ALLOCATOR_GAUGE = "collm_process_allocator_info"  # which malloc the agent runs on (jemalloc when preloaded)
FREED_WAIT_S = 10.0  # after the load: how long the engines may take to drop their last rows


def run(
    *,
    minutes: float = 30.0,
    round_every_s: float = 60.0,
    sample_every_s: float = 10.0,
    warmup_minutes: float | None = None,
    replicas: int = 2,
    rate: float = 2.0,
    trace: str = "conv",
    model: str = "tiny",
    local_steps: int = 10,
    drain_s: float = 120.0,
    preload: str | None = None,
    targets: Targets | None = None,
    json_path: str | None = None,
) -> dict:
    targets = targets or Targets()
    if preload is not None and not Path(preload).is_file():
        raise ValueError(f"--preload {preload}: no such file (jemalloc is libjemalloc.so.2, in Debian's and Ubuntu's libjemalloc2)")
    duration = minutes * 60.0
    warmup_s = warmup_minutes * 60.0 if warmup_minutes is not None else WARMUP_SHARE * duration
    if duration <= 0 or sample_every_s <= 0 or round_every_s <= 0 or rate <= 0:
        raise ValueError("--minutes, --sample-every, --round-every and --rate must be positive")
    if not 0 <= warmup_s < duration:
        raise ValueError(f"the warm-up ({warmup_s:.0f} s) must end before the run does ({duration:.0f} s): shorten --warmup-minutes")
    configs = replica_configs(replicas, model=model)
    arrivals = trace_slice(trace, rate=rate, duration_s=duration)
    if len(arrivals) < round(rate * duration):
        raise ValueError(f"the {trace} trace has {len(arrivals)} requests, fewer than {minutes:g} minutes at {rate:g} req/s need: lower --rate")
    workload = workload_for(configs, arrivals, load_base_model(model).tokenizer)
    settings = ControllerSettings(policy="coexec", slow_interval_s=min(5.0, round_every_s / 2), round_interval_s=round_every_s, local_steps=local_steps)
    run_settings = {
        "minutes": minutes,
        "round_every_s": round_every_s,
        "sample_every_s": sample_every_s,
        "warmup_s": warmup_s,
        "replicas": replicas,
        "rate": rate,
        "trace": trace,
        "model": model,
        "local_steps": local_steps,
        "preload": preload,
    }
    with _preloaded(preload):  # the agents and the router start with it (local mode restarts none)
        deployment = LocalDeployment.start(configs, settings, processes=True)
    try:
        processes = deployment.managed_processes()
        watched = {name: psutil.Process(p.pid) for name, p in processes.items()}
        urls = {name: r.http_url for name, r in deployment.replicas.items()}
        engines_idle = {name: read_engine(url) for name, url in urls.items()}
        traffic = TrafficReplay(deployment.router_url, workload, settings.ttft_ms, settings.tpot_ms)
        deployment.arrivals = lambda: traffic.sent
        traffic.start()
        samples, engine_samples = _watch(traffic, processes, watched, urls, every_s=sample_every_s, deadline_s=duration + drain_s)
        elapsed = time.time() - traffic.started_at
        engines_end = {name: wait_freed(url) for name, url in urls.items()}
        allocators = {name: read_allocator(url) for name, url in urls.items()}
        at_end = {name: sample_process(watched[name], time.time() - traffic.started_at) for name in watched}
        deployment.controller.stop()  # lets a round in progress finish
        history = deployment.controller.history
    finally:
        deployment.stop()
        deployment.cleanup()
    records = list(traffic.records)
    answered = sum(1 for r in records if r.ok)
    failed = traffic.sent - answered  # failed at the client, or still unanswered at the deadline
    figures = {name: {**process_figures(s, warmup_s, targets), "at_end": at_end[name].as_list()} for name, s in samples.items()}
    config = {c.replica_id: c for c in configs}
    engines = {
        name: _engine_figures(engines_idle[name], engine_samples[name], engines_end[name], config[name], warmup_s) | {"allocator": allocators[name]}
        for name in urls
    }
    kv_freed = all(e["kv_rows_in_use_end"] == 0 and e["pinned_requests_end"] == 0 for e in engines.values())
    rounds = [r.summary() for r in history.rounds]
    result = {
        "benchmark": "soak",
        "settings": run_settings,
        "duration_s": elapsed,
        "processes": figures,
        "engines": engines,
        "requests": {
            "planned": len(arrivals),
            "sent": traffic.sent,
            "answered": answered,
            "failed": failed,
            "failures": [r.error for r in records if not r.ok][:5],
        },
        "rounds": {
            "started": len(rounds),
            "succeeded": sum(1 for r in rounds if r["result"] == "Succeeded"),
            "results": [r["result"] for r in rounds],
            "errors": [r["error"] for r in rounds if r["error"]][:5],
        },
        "controller_errors": history.errors[:10],
        "targets": {**targets.as_dict(), "kv_rows_in_use_end": 0},
        "passed": overall(figures, failed_requests=failed, kv_freed=kv_freed, targets=targets),
        "sample_fields": list(SAMPLE_FIELDS),
        "samples": {name: [s.as_list() for s in series] for name, series in samples.items()},
        "engine_samples": engine_samples,
        "machine": machine(),
    }
    print_summary(result)
    write_json(result, json_path)
    return result


def _watch(
    traffic: TrafficReplay,
    processes: dict[str, ManagedProcess],
    watched: dict[str, psutil.Process],
    urls: dict[str, str],
    *,
    every_s: float,
    deadline_s: float,
) -> tuple[dict[str, list[ProcessSample]], dict[str, list[dict]]]:
    """A sample of every process and engine every `every_s` from the first request until every
    answer is in (or `deadline_s` after the first request)."""
    samples: dict[str, list[ProcessSample]] = {name: [] for name in watched}
    engine_samples: dict[str, list[dict]] = {name: [] for name in urls}
    taken = 0
    while True:
        t = time.time() - traffic.started_at
        for name, process in processes.items():
            process.check_alive()  # a crash fails the run with the end of its log
            samples[name].append(sample_process(watched[name], t))
        for name, url in urls.items():
            engine_samples[name].append({"t": round(t, 3), **read_engine(url)})
        taken += 1
        until_next = taken * every_s - (time.time() - traffic.started_at)
        if traffic.wait(max(0.0, until_next)) or time.time() - traffic.started_at > deadline_s:
            return samples, engine_samples


@contextlib.contextmanager
def _preloaded(library: str | None) -> Iterator[None]:
    """LD_PRELOAD `library` into the processes started inside (as the image preloads jemalloc)."""
    if library is None:
        yield
        return
    before = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = str(Path(library).resolve())
    try:
        yield
    finally:
        if before is None:
            del os.environ["LD_PRELOAD"]
        else:
            os.environ["LD_PRELOAD"] = before


def sample_process(process: psutil.Process, t: float) -> ProcessSample:
    with process.oneshot():
        return ProcessSample(t, process.memory_info().rss, process.num_threads(), process.num_fds(), len(process.open_files()))


def _exposition(url: str):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        return text_string_to_metric_families(reply.read().decode())


def read_allocator(url: str) -> str:
    """The malloc the agent runs on, as it says (`unknown` from an agent that does not)."""
    return next((f.samples[0].labels["allocator"] for f in _exposition(url) if f.name == ALLOCATOR_GAUGE), "unknown")


def read_engine(url: str) -> dict[str, int]:
    """The agent's ENGINE_GAUGES from its Prometheus exposition (labelled series summed)."""
    values = dict.fromkeys(ENGINE_GAUGES.values(), 0)
    for family in _exposition(url):
        if family.name in ENGINE_GAUGES:  # every one a count
            values[ENGINE_GAUGES[family.name]] = round(sum(s.value for s in family.samples))
        elif family.name == HEAP_GAUGE:  # glibc only: absent elsewhere
            values |= {f"heap_{s.labels['state']}_bytes": round(s.value) for s in family.samples}
        elif family.name == TRIM_GAUGE:  # absent when the agent does not trim
            values["heap_trim_longest_us"] = round(family.samples[0].value * 1e6)
    return values


def wait_freed(url: str, timeout_s: float = FREED_WAIT_S) -> dict[str, int]:
    """The engine's gauges once no request runs (or as they are after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = read_engine(url)
        if (values["kv_rows_in_use"] == 0 and values["pinned_requests"] == 0) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def _engine_figures(idle: dict, samples: list[dict], end: dict, config, warmup_s: float) -> dict:
    post = [x for x in samples if x["t"] >= warmup_s]
    heap = {
        f"heap_{state}_mb_per_hour": memory_slope_mb_per_hour([x["t"] for x in post], [x[f"heap_{state}_bytes"] for x in post])
        for state in ("in_use", "free")
        if len(post) >= 3 and all(f"heap_{state}_bytes" in x for x in post)
    }
    return (
        heap
        | {
            "kv_rows_total": config.max_batch,
            "kv_rows_in_use_idle": idle["kv_rows_in_use"],
            "kv_rows_in_use_max": max((s["kv_rows_in_use"] for s in samples), default=0),
            "kv_rows_in_use_end": end["kv_rows_in_use"],
            "kv_rows_free_end": config.max_batch - end["kv_rows_in_use"],
            "queue_max": max((s["queue"] for s in samples), default=0),
            "adapter_slots_total": config.lora_slots,
            "adapter_slots_in_use_idle": idle["adapter_slots_in_use"],
            "adapter_slots_in_use_max": max((s["adapter_slots_in_use"] for s in samples), default=0),
            "adapter_slots_in_use_end": end["adapter_slots_in_use"],
            "pinned_requests_end": end["pinned_requests"],
        }
        | ({"heap_trim_longest_ms": end["heap_trim_longest_us"] / 1000} if "heap_trim_longest_us" in end else {})
    )


def _verdict(value: bool | None) -> str:
    return "pass" if value is True else "FAIL" if value is False else "no verdict"


def _process_verdict(passed: dict[str, bool | None]) -> str:
    failed = [k for k, v in passed.items() if v is False]
    return f"FAIL: {', '.join(failed)}" if failed else _verdict(None if None in passed.values() else True)


def print_summary(result: dict) -> None:
    s, t = result["settings"], result["targets"]

    def counts(c: dict) -> str:
        return "{first}/{last}/{max} ({growth:+g})".format(**c) if c["growth"] is not None else "{first}/{last}/{max}".format(**c)

    rows = []
    for name, p in result["processes"].items():
        slope = p["memory_slope_mb_per_hour"]
        rss = p["rss_mb"]
        rows.append(
            [
                name,
                f"{rss['first']:.0f} -> {rss['last']:.0f} ({rss['max']:.0f})",
                f"{slope:+.1f}" if slope is not None else "-",
                counts(p["threads"]),
                counts(p["fds"]),
                counts(p["files"]),
                _process_verdict(p["passed"]),
            ]
        )
    print_table(
        f"Soak: {result['duration_s'] / 60:.1f} minutes, {s['replicas']} replicas of {s['model']!r} at {s['rate']:g} req/s, "
        f"a round every {s['round_every_s']:g} s, warm-up {s['warmup_s']:.0f} s",
        [
            "process",
            "RSS MB first -> last (max)",
            f"MB/h after warm-up (< {t['memory_mb_per_hour']:g})",
            f"threads first/last/max (growth <= {t['thread_growth']})",
            f"fds (growth <= {t['fd_growth']})",
            f"files (growth <= {t['file_growth']})",
            "verdict",
        ],
        rows,
    )
    r, rounds, p = result["requests"], result["rounds"], result["passed"]
    kv = "; ".join(
        f"{n}: {e['kv_rows_in_use_idle']} / {e['kv_rows_in_use_max']} / {e['kv_rows_in_use_end']} of {e['kv_rows_total']}" for n, e in result["engines"].items()
    )
    heap = "; ".join(
        f"{n}: {e['heap_in_use_mb_per_hour']:+.1f} / {e['heap_free_mb_per_hour']:+.1f}" for n, e in result["engines"].items() if "heap_in_use_mb_per_hour" in e
    )
    trims = "; ".join(
        f"{n}: {e['allocator']}" + (f", longest trim {e['heap_trim_longest_ms']:.1f} ms" if "heap_trim_longest_ms" in e else "")
        for n, e in result["engines"].items()
    )
    print_table(
        "Soak: requests, rounds, KV-cache rows",
        ["figure", "value", "verdict"],
        [
            ["requests sent / answered / failed", f"{r['sent']} / {r['answered']} / {r['failed']}", _verdict(p["requests"])],
            ["rounds started / succeeded", f"{rounds['started']} / {rounds['succeeded']}", ""],
            ["KV rows in use: idle / max sampled / after the load", kv, _verdict(p["kv_freed"])],
            ["malloc heap after warm-up, in use / free (MB/h)", heap or "not glibc", ""],
            ["malloc; the longest of its periodic trims", trims, ""],
            ["all targets", "", _verdict(p["all"])],
        ],
    )
