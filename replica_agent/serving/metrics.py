"""Prometheus metrics of one agent, on a registry of its own (several agents may share a process).

Counters and histograms are fed by the engine's observers (every finished request, every
iteration); gauges that mirror state (adapter version, pinned versions, losses, training share)
are read at scrape time from the agent, so they can never go stale.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .. import memory
from ..engine.mixer import IterationStats
from ..engine.requests import FinalEvent, FinishReason

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class AgentMetrics:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("collm_requests", "Requests by outcome (finish reason, rejected, error)", ["outcome"], registry=r)
        self.slo_requests = Counter("collm_slo_requests", "Finished requests by whether they met the TTFT and TPOT SLO", ["met"], registry=r)
        self.ttft = Histogram("collm_time_to_first_token_seconds", "Time from arrival to the first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "collm_time_per_output_token_seconds", "Mean time per output token after the first, per request", buckets=TPOT_BUCKETS, registry=r
        )
        self.queue_time = Histogram("collm_queue_seconds", "Time a request waited before admission", buckets=LATENCY_BUCKETS, registry=r)
        self.inference_tokens = Counter("collm_inference_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("collm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.iterations = Counter("collm_engine_iterations", "Engine iterations (idle ticks included)", registry=r)
        self.batch_size = Histogram("collm_batch_size", "Running requests per decode iteration", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.iteration_time = Histogram("collm_iteration_seconds", "Wall time of busy engine iterations", buckets=LATENCY_BUCKETS, registry=r)
        self._slo_window: list[tuple[float, bool]] = []
        self._started = time.monotonic()
        r.register(_StateCollector(self))
        agent.engine.observers.append(self.observe)

    def observe(self, kind: str, payload) -> None:
        if kind == "finished":
            self._finished(payload)
        elif kind == "iteration":
            self._iteration(payload)

    def _finished(self, final: FinalEvent) -> None:
        self.requests.labels(final.finish_reason.value).inc()
        if final.finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR):
            return
        self.inference_tokens.inc(final.generated_tokens)
        self.prompt_tokens.inc(final.prompt_tokens)
        if final.ttft_s is not None:
            self.ttft.observe(final.ttft_s)
        if final.tpot_s is not None:
            self.tpot.observe(final.tpot_s)
        if final.queue_s is not None:
            self.queue_time.observe(final.queue_s)
        met = final.meets_slo(self.agent.mixer.settings.ttft_ms, self.agent.mixer.settings.tpot_ms)
        self.slo_requests.labels("true" if met else "false").inc()
        now = time.monotonic()
        self._slo_window.append((now, met))
        self._slo_window = [(t, m) for t, m in self._slo_window if now - t <= 60.0]

    def _iteration(self, stats: IterationStats) -> None:
        self.iterations.inc()
        if stats.decode_rows:
            self.batch_size.observe(stats.decode_rows)
            self.iteration_time.observe(stats.iteration_ms / 1000)

    def reject(self, outcome: str) -> None:
        """Count a request that never reached the engine (validation, overload)."""
        self.requests.labels(outcome).inc()

    def slo_attainment(self) -> float | None:
        """Share of requests finished in the last 60 s that met the SLO (None when there were none)."""
        window = self._slo_window
        return sum(m for _, m in window) / len(window) if window else None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read from the agent at scrape time."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        agent = self.metrics.agent
        stats = agent.stats()
        elapsed = max(time.monotonic() - self.metrics._started, 1e-9)

        def gauge(name, doc, value, labels=None):
            family = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
            if labels:
                for label_values, v in value:
                    family.add_metric(label_values, v)
            elif value is not None:
                family.add_metric([], float(value))
            return family

        yield gauge("collm_queue_depth", "Requests waiting for admission", stats.queue_depth)
        yield gauge("collm_running_requests", "Requests in the running batch", stats.running)
        yield gauge("collm_training_share", "Training budget as a share of the plan's cap (batch mixer)", stats.training_share)
        yield gauge("collm_training_cap_tokens", "Training tokens per iteration the plan allows", stats.train_cap_tokens)
        yield gauge("collm_training_tokens_total", "Training tokens processed", stats.training_tokens)
        yield gauge("collm_training_steps_total", "Training steps of the shadow adapter", stats.training_steps)
        yield gauge("collm_inference_tokens_per_second", "Generated tokens per second since start", stats.inference_tokens / elapsed)
        yield gauge("collm_training_tokens_per_second", "Training tokens per second since start", stats.training_tokens / elapsed)
        yield gauge("collm_train_loss", "Loss of the last training step", stats.train_loss)
        yield gauge("collm_eval_loss", "Held-out eval loss of the last evaluated shadow", stats.eval_loss)
        adapter = stats.adapter
        yield gauge("collm_adapter_version", "Cluster version of the served adapter (the global it rests on)", adapter.cluster_version if adapter else None)
        yield gauge(
            "collm_adapter_revision",
            "Local revision of the served adapter on top of its cluster version (0: the global itself)",
            adapter.revision if adapter else None,
        )
        yield gauge(
            "collm_adapter_info",
            "The served adapter: version label <cluster version>.<local revision> and sha256",
            [([adapter.version, adapter.sha256], 1.0)] if adapter else [],
            labels=["version", "sha256"],
        )
        yield gauge("collm_local_revisions_total", "Local revisions published (passed the eval gate)", stats.revisions_published)
        yield gauge("collm_local_revisions_rejected_total", "Shadow evaluations that did not pass the eval gate", stats.revisions_rejected)
        yield gauge("collm_adapter_eval_loss", "Eval loss recorded with the current adapter version", adapter.eval_loss if adapter else None)
        pins = stats.extra.get("pins") or {}
        yield gauge("collm_live_adapter_versions", "Adapter versions in use (current or pinned)", len(stats.live_versions))
        yield gauge(
            "collm_pinned_requests", "Requests holding each adapter version", [([label], float(n)) for label, n in sorted(pins.items())], labels=["version"]
        )
        yield gauge(
            "collm_process_allocator_info", "The process's malloc: jemalloc (preloaded), glibc or other", [([memory.allocator()], 1.0)], labels=["allocator"]
        )
        heap = memory.heap()
        if heap is not None:
            yield gauge(
                "collm_process_heap_bytes",
                "The process's malloc heap, every arena: in use, and free but kept by the allocator (fragmentation)",
                [([state], float(n)) for state, n in heap.items()],
                labels=["state"],
            )
        trimmer = self.metrics.agent.trimmer
        if trimmer is not None:
            yield gauge("collm_process_heap_trims_total", "Periodic malloc_trim calls (heap_trim_interval_s)", trimmer.trims)
            yield gauge("collm_process_heap_trim_longest_seconds", "The longest periodic malloc_trim so far", trimmer.longest_s)
        attainment = self.metrics.slo_attainment()
        yield gauge("collm_slo_attainment", "Share of requests in the last 60 s that met the SLO", attainment)
