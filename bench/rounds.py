"""`collm bench round` and `collm bench federated`: federated rounds measured on loopback.

- round: wall time, aggregation time, bytes per participant and adapter freshness (end of
  aggregation until every replica serves the new version) for LoRA ranks 8, 16 and 64 with FedAvg
  and FFA-LoRA, and one case of 8 participants with ~10 MB adapters; requests stream to every
  replica during the round and failed ones are counted.
- federated: several rounds on three replicas with non-IID data (one standard-library package
  each) against centralized LoRA training on the union of their data for the same total number of
  steps; both adapters are evaluated on every replica's held-out split (token-weighted).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from collm_control import rounds as R
from collm_rpc.driver import RoundDriver, StrategyConfig
from replica_agent.config import AgentConfig
from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.data import LocalDataset, stdlib_package_dir
from replica_agent.engine.model_host import load_base_model
from replica_agent.engine.requests import SamplingParams
from replica_agent.engine.trainer import Trainer, TrainerSettings
from replica_agent.local.in_process import LocalCluster
from replica_agent.report import machine, print_table, write_json

PACKAGES = ("json", "http", "email", "logging", "urllib", "xml", "unittest", "importlib")
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _configs(n: int, **overrides) -> list[AgentConfig]:
    # No local revisions: these benchmarks measure rounds (the replicas still train between them).
    base = dict(model="tiny", eval_batches=1, max_total_tokens=256, micro_batch=2, seq_len=64, learning_rate=5e-3, revision_every_seconds=0)
    return [AgentConfig(**{**base, **overrides}, replica_id=f"agent-{i}", data=str(stdlib_package_dir(PACKAGES[i]))) for i in range(n)]


def _spec(round_id: str, names: list[str], local_steps: int, tolerance: float = 1.0) -> R.RoundSpec:
    return R.RoundSpec(
        round_id=round_id,
        replicas=tuple(names),
        participants=tuple(names),
        aggregator=names[0],
        local_steps=local_steps,
        deadline_s=600.0,
        min_participants=len(names),
        eval_tolerance=tolerance,
    )


class _Load:
    """Requests to every replica, one client thread, during the measured round."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster, self.done, self.failed = cluster, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for r in self.cluster.replicas.values():
                _, final = r.agent.engine.generate(r.agent.engine.encode("def round_trip("), SamplingParams(max_new_tokens=6, ignore_eos=True))
                if final.ok:
                    self.done += 1
                else:
                    self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def run_case(base, *, rank: int, targets: list[str], participants: int, strategy: str, local_steps: int = 2) -> dict:
    with LocalCluster(_configs(participants, lora_rank=rank, lora_alpha=2 * rank, lora_targets=targets, train_only_b=strategy == "ffa"), base=base) as cluster:
        names = list(cluster.replicas)
        adapter_bytes = sum(t.numel() * t.element_size() for t in cluster[names[0]].agent.store.current.tensors.values())
        load = _Load(cluster)
        started = time.time()
        state = RoundDriver(
            _spec(f"bench-{strategy}-r{rank}-n{participants}", names, local_steps), cluster.addresses, strategy=StrategyConfig(strategy), round_number=1
        ).run(timeout_s=600)
        wall = time.time() - started
        load.stop()
    return {
        "rank": rank,
        "targets": targets,
        "participants": participants,
        "strategy": strategy,
        "succeeded": state.succeeded,
        "adapter_bytes": adapter_bytes,
        "bytes_per_participant": state.bytes_uploaded / participants,
        "round_wall_s": wall,
        "aggregation_s": state.aggregated_at - state.trained_at,
        "freshness_s": state.freshness_s,
        "aggregation_and_publish_s": (state.aggregated_at - state.trained_at) + state.freshness_s,
        "requests_during_round": load.done,
        "failed_requests": load.failed,
    }


def run_round_bench(*, json_path: str | None = None, ranks=(8, 16, 64), big: bool = True) -> dict:
    base = load_base_model("tiny")
    cases = [run_case(base, rank=r, targets=["q_proj", "v_proj"], participants=3, strategy=s) for r in ranks for s in ("fedavg", "ffa")]
    if big:
        cases.append(run_case(base, rank=128, targets=ALL_MODULES, participants=8, strategy="fedavg", local_steps=1))
    result = {
        "benchmark": "round",
        "cases": cases,
        "targets": {"aggregation_and_publish_s": 2.0, "freshness_s": 1.0, "failed_requests": 0},
        "machine": machine(),
    }
    print_table(
        "Federated round on loopback (tiny model)",
        ["strategy", "rank", "participants", "adapter MB", "MB / participant", "round s", "aggregate s", "freshness s", "failed"],
        [
            [
                c["strategy"],
                c["rank"],
                c["participants"],
                c["adapter_bytes"] / 1e6,
                c["bytes_per_participant"] / 1e6,
                c["round_wall_s"],
                c["aggregation_s"],
                c["freshness_s"],
                c["failed_requests"],
            ]
            for c in cases
        ],
    )
    write_json(result, json_path)
    return result


def run_federated_bench(*, rounds: int = 5, local_steps: int = 20, json_path: str | None = None) -> dict:
    base = load_base_model("tiny")
    names, packages = [f"agent-{i}" for i in range(3)], PACKAGES[:3]
    history = []
    # The whole held-out split (up to 64 chunks of 128 tokens) per evaluation: the gate needs a steady figure.
    with LocalCluster(_configs(3, eval_batches=0, micro_batch=4, seq_len=128, learning_rate=2e-3), base=base) as cluster:
        for n in range(1, rounds + 1):
            state = RoundDriver(_spec(f"fed-{n}", names, local_steps, tolerance=0.02), cluster.addresses, round_number=n).run(timeout_s=900)
            history.append(
                {
                    "round": n,
                    "succeeded": state.succeeded,
                    "result": state.conditions[R.Condition.SUCCEEDED].reason,
                    "eval_loss_before": state.eval_loss_before,
                    "eval_loss_after": state.eval_loss_after,
                }
            )
        for name in names:  # what the rounds published is compared now: the replicas stop training
            cluster[name].agent.trainer.pause()
        federated = dict(cluster[names[0]].agent.store.global_version.tensors)
        evaluators = [cluster[name].agent.trainer for name in names]
        initial = dict(cluster[names[0]].agent.store.get(1).tensors)
        # The replicas train continuously; the last global holds every step up to each one's last upload.
        steps = sum(cluster[name].agent.trainer.steps_uploaded for name in names)
        with tempfile.TemporaryDirectory() as tmp:
            union = Path(tmp)
            for pkg in packages:
                shutil.copytree(stdlib_package_dir(pkg), union / pkg, ignore=shutil.ignore_patterns("__pycache__"))
            c0 = cluster[names[0]].agent
            store = AdapterStore()
            store.publish(initial, cluster_version=0)
            central = Trainer(
                c0.runtime,
                LocalDataset.from_path(union, c0.tokenizer, seq_len=c0.config.seq_len),
                store,
                c0.spec,
                settings=TrainerSettings(learning_rate=c0.config.learning_rate, micro_batch=c0.config.micro_batch),
            )
            for _ in range(steps):
                central.train_step()
            centralized = central.snapshot()

        def weighted(tensors):
            losses = [(t.evaluate(tensors), t.eval_tokens) for t in evaluators]
            return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)

        fed_loss, central_loss, initial_loss = weighted(federated), weighted(centralized), weighted(initial)
    result = {
        "benchmark": "federated",
        "rounds": rounds,
        "local_steps": local_steps,
        "total_steps": steps,  # training steps in the final global adapter, over all replicas (>= rounds x local_steps x 3)
        "packages": list(packages),
        "initial_loss": initial_loss,
        "federated_loss": fed_loss,
        "centralized_loss": central_loss,
        "ratio": fed_loss / central_loss,
        "target_ratio": 1.1,
        "history": history,
        "machine": machine(),
    }
    print_table(
        f"Federated vs centralized LoRA ({rounds} rounds of at least {local_steps} steps x 3 replicas; {steps} steps in the final global)",
        ["adapter", "held-out loss (token-weighted over the 3 replicas)"],
        [
            ["initial", initial_loss],
            ["federated (FedAvg)", fed_loss],
            ["centralized on the union", central_loss],
            ["ratio (target <= 1.1)", fed_loss / central_loss],
        ]
        + [[f"round {h['round']}: before -> after ({h['result']})", f"{h['eval_loss_before']:.3f} -> {h['eval_loss_after']:.3f}"] for h in history],
    )
    write_json(result, json_path)
    return result
