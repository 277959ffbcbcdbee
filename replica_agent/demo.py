"""`collm demo` (what `make demo` runs): one agent serves requests while it fine-tunes, then reports.

The agent runs the tiny built-in model (pre-trained on English prose) and fine-tunes its adapter on
the standard library's `json` package (Python code: a new domain). Clients call the real HTTP
server through the `text_generation` client, streaming, while the trainer publishes new adapter
versions. Every figure printed is measured from the requests and the adapter store.
"""

from __future__ import annotations

import random
import statistics
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from text_generation import Client

from collm_bench.report import print_table, write_json

from .agent import Agent
from .config import AgentConfig
from .engine.data import read_examples, stdlib_package_dir
from .serving.background import BackgroundServer


def _prompts(package: str = "json", count: int = 200, seed: int = 0) -> list[str]:
    """Starts of lines of real Python code, as a code-completion client would send."""
    lines = []
    for example in read_examples(stdlib_package_dir(package)):
        lines += [line for line in (example.text or "").splitlines() if len(line.strip()) > 12]
    rng = random.Random(seed)
    return [line[: rng.randint(8, min(60, len(line)))] for line in rng.sample(lines, min(count, len(lines)))]


def run_demo(model: str = "tiny", *, duration_s: float = 60.0, clients: int = 4, publish_every: int = 40, ttft_ms: int = 1000, tpot_ms: int = 100, json_path: str | None = None) -> dict:
    console = Console()
    console.print(f"[bold]CoLLM demo[/]: one replica agent on the {model!r} model serves and fine-tunes at once ({duration_s:.0f} s of traffic)")
    config = AgentConfig(model=model, data=str(stdlib_package_dir("json")), publish_every=publish_every, port=0, ttft_ms=ttft_ms, tpot_ms=tpot_ms, max_total_tokens=512, eval_batches=4)
    agent = Agent(config)
    first = agent.start()
    server = BackgroundServer(agent, config.host, config.port)
    prompts = _prompts()
    records: list[dict] = []
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client_loop(index: int) -> None:
        client = Client(server.url, timeout=60)
        rng = random.Random(index)
        while time.monotonic() < deadline:
            prompt = rng.choice(prompts)
            start = time.perf_counter()
            first_at, count, details = None, 0, None
            try:
                for event in client.generate_stream(prompt, max_new_tokens=rng.randint(16, 48)):
                    count += 1
                    first_at = first_at or time.perf_counter()
                    details = event.details or details
            except Exception as exc:  # counted and shown: the demo must not hide a failure
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.perf_counter()
            ttft = (first_at - start) * 1000
            tpot = (end - first_at) * 1000 / (count - 1) if count > 1 else 0.0
            with lock:
                records.append({"ttft_ms": ttft, "tpot_ms": tpot, "tokens": count, "met": ttft <= ttft_ms and tpot <= tpot_ms, "finish": details.finish_reason.value if details else None})

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("serving + training", total=duration_s)
        for t in threads:
            t.start()
        started = time.monotonic()
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            stats = agent.stats()
            progress.update(
                task,
                completed=min(duration_s, time.monotonic() - started),
                description=f"served {len(records):4d}  adapter v{stats['adapter']['version']}  train steps {stats['training_steps']:4d}  share {stats['training_share']:.2f}",
            )
    final_version = agent.publish()
    stats = agent.stats()
    server.stop()
    agent.stop()

    served = len(records)
    met = sum(r["met"] for r in records)
    published = [v for v in agent.store.retained()]
    result = {
        "model": agent.base.name,
        "duration_s": duration_s,
        "clients": clients,
        "requests_served": served,
        "requests_failed": len(failures),
        "failures": failures[:5],
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
        "slo_attainment": met / served if served else 0.0,
        "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in records) if records else 0.0,
        "tpot_ms_p50": statistics.median(r["tpot_ms"] for r in records) if records else 0.0,
        "generated_tokens": sum(r["tokens"] for r in records),
        "training_steps": stats["training_steps"],
        "training_tokens": stats["training_tokens"],
        "adapter_versions_published": final_version.number,
        "retained_versions": published,
        "eval_loss_before": first.eval_loss,
        "eval_loss_after": final_version.eval_loss,
    }
    print_table(
        "CoLLM demo: one replica serving and fine-tuning at once",
        ["figure", "value"],
        [
            ["requests served (failed)", f"{served} ({len(failures)})"],
            [f"SLO attainment (TTFT <= {ttft_ms} ms, TPOT <= {tpot_ms} ms)", f"{result['slo_attainment']:.1%}"],
            ["TTFT p50 / TPOT p50 (ms)", f"{result['ttft_ms_p50']:.1f} / {result['tpot_ms_p50']:.1f}"],
            ["tokens generated", result["generated_tokens"]],
            ["training steps (tokens)", f"{result['training_steps']} ({result['training_tokens']:,})"],
            ["adapter versions published", result["adapter_versions_published"]],
            ["held-out eval loss, version 1 -> latest", f"{first.eval_loss:.3f} -> {final_version.eval_loss:.3f}"],
        ],
        console=console,
    )
    write_json(result, json_path)
    return result
