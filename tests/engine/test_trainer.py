"""Continuous training of the shadow adapter: local revisions, round snapshots and the rebase."""

from __future__ import annotations

import time

import pytest
import torch

from replica_agent.agent import Agent, Plan
from replica_agent.config import AgentConfig
from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.data import LocalDataset, stdlib_package_dir
from replica_agent.engine.llama import LlamaRuntime
from replica_agent.engine.lora import LoraSpec, init_adapter
from replica_agent.engine.revisions import RevisionSettings, passes_gate, revision_due
from replica_agent.engine.trainer import Trainer, TrainerSettings
from replica_agent.federated.update import make_update
from tests.helpers import eventually

SPEC = LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def runtime(tiny_base):
    return LlamaRuntime(tiny_base.config, tiny_base.state_dict)


@pytest.fixture(scope="module")
def dataset(tiny_base):
    return LocalDataset.from_path(stdlib_package_dir("json"), tiny_base.tokenizer, seq_len=128)


def make_trainer(runtime, dataset, *, lr=3e-3, tolerance=0.0):
    store = AdapterStore()
    store.publish(init_adapter(SPEC, runtime.dims, seed=0), cluster_version=0)
    settings = TrainerSettings(learning_rate=lr, micro_batch=4, eval_batches=2, revisions=RevisionSettings(every_steps=0, every_s=0, tolerance=tolerance))
    return Trainer(runtime, dataset, store, SPEC, settings=settings), store


def test_revision_cadence_and_gate_are_pure_rules():
    s = RevisionSettings(every_steps=10, every_s=5.0)
    assert not revision_due(s, 0, 100.0)  # nothing trained since the last check
    assert revision_due(s, 10, 0.0) and revision_due(s, 1, 5.0) and not revision_due(s, 9, 4.9)
    assert not revision_due(RevisionSettings(every_steps=0, every_s=0), 100, 100.0)
    assert passes_gate(2.0, 2.0, 0.0) and not passes_gate(2.0001, 2.0, 0.0) and passes_gate(2.04, 2.0, 0.05)
    assert not passes_gate(float("nan"), 2.0, 0.0) and passes_gate(2.5, None, 0.0)
    with pytest.raises(ValueError, match="every_steps"):
        RevisionSettings(every_steps=-1)


def test_a_local_revision_never_serves_a_worse_held_out_loss(runtime, dataset):
    trainer, store = make_trainer(runtime, dataset)
    served = [trainer.local_loss(store.current)]
    for _ in range(4):
        for _ in range(5):
            trainer.train_step()
        version = trainer.publish_revision()
        if version is not None:
            assert version.label == f"0.{len(served)}" and version.eval_loss <= served[-1]
            served.append(version.eval_loss)
    assert len(served) >= 3 and served[-1] < served[0] - 0.05, served
    # A shadow that got worse (noise on top of what is served) is refused and the served version stays.
    before = store.current
    with torch.no_grad():
        for key, value in trainer.shadow.items():
            if key.endswith("lora_B.weight"):
                value.add_(torch.randn_like(value) * 0.5)
    assert trainer.evaluate() > trainer.local_loss(before)
    assert trainer.publish_revision() is None and store.current is before and trainer.revisions_rejected == 1


def test_the_rebase_loses_and_double_counts_no_step(runtime, dataset):
    """Rounds upload `snapshot - global`; a new global G' rebases the shadow to G' + (shadow - upload).
    With every upload in the next global, the uploads add up to exactly what was trained."""
    trainer, store = make_trainer(runtime, dataset)
    trained = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in trainer.shadow.items()}

    def train(steps):
        for _ in range(steps):
            before = trainer.snapshot()
            trainer.train_step()
            for k, v in trainer.snapshot().items():
                trained[k] += (v - before[k]).double()

    uploaded = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in trained.items()}
    for round_number in (1, 2, 3):
        train(3)
        snap = trainer.round_snapshot(f"r{round_number}")
        assert trainer.round_snapshot(f"r{round_number}") is snap  # a retried StartRound uploads the same
        update = make_update("me", f"r{round_number}", snap.shadow, snap.base, 1)
        for k, d in update.delta.items():
            uploaded[k] += d.double()
        assert snap.steps == 3 + (2 if round_number > 1 else 0)  # what was trained after the last upload counts here
        train(2)  # training goes on while the round aggregates
        # The aggregate: some other global (other replicas' updates in it), holding ours.
        new_global = {k: v + 0.01 * torch.randn_like(v) for k, v in store.global_version.tensors.items()}
        version = store.publish(new_global, cluster_version=round_number)
        trainer.rebase(version, round_id=f"r{round_number}", included=True)
        assert trainer.unuploaded_steps == 2 and trainer.global_version is version
    train(1)
    final = trainer.round_snapshot("r4")
    for k, d in make_update("me", "r4", final.shadow, final.base, 1).delta.items():
        uploaded[k] += d.double()
    for k in trained:
        assert torch.allclose(uploaded[k], trained[k], atol=1e-5), k


def test_an_upload_left_out_of_the_global_is_uploaded_again(runtime, dataset):
    trainer, store = make_trainer(runtime, dataset)
    for _ in range(3):
        trainer.train_step()
    trainer.round_snapshot("r1")
    version = store.publish({k: v.clone() for k, v in store.global_version.tensors.items()}, cluster_version=1)
    trainer.rebase(version, round_id="r1", included=False)  # e.g. rejected as an outlier, or late
    assert trainer.unuploaded_steps == 3
    nxt = trainer.round_snapshot("r2")
    assert nxt.steps == 3 and nxt.base_sha256 == version.sha256


@pytest.fixture
def agent(tiny_base):
    config = AgentConfig(
        model="tiny",
        data=str(stdlib_package_dir("json")),
        seq_len=64,
        micro_batch=2,
        eval_batches=1,
        lora_rank=4,
        lora_targets=["q_proj", "v_proj"],
        revision_every_seconds=0.3,
        learning_rate=5e-3,
    )
    agent = Agent(config, base=tiny_base)
    agent.start()
    yield agent
    agent.stop()


def test_training_continues_without_rounds_serves_revisions_and_stops_at_cap_zero(agent):
    assert eventually(lambda: agent.trainer.step >= 10, timeout=60)
    assert eventually(lambda: agent.store.current.label != "0.0", timeout=60), "a local revision goes live between rounds"
    assert agent.store.current.cluster_version == 0 and agent.stats().adapter.version == agent.store.current.label
    agent.apply_plan(Plan(train_cap_tokens=0, ttft_ms=1000, tpot_ms=100))
    time.sleep(0.5)  # a step that had its budget finishes
    stopped = agent.trainer.step
    time.sleep(1.0)
    assert agent.trainer.step == stopped, "a cap of 0 means no training"
    agent.apply_plan(Plan(train_cap_tokens=128, ttft_ms=1000, tpot_ms=100))
    assert eventually(lambda: agent.trainer.step > stopped, timeout=30)


def test_a_new_global_is_served_at_once_and_the_shadow_keeps_its_progress(agent):
    assert eventually(lambda: agent.trainer.step >= 5, timeout=60)
    agent.apply_plan(Plan(train_cap_tokens=0, ttft_ms=1000, tpot_ms=100))
    time.sleep(0.5)
    progress = {k: v - agent.trainer.global_version.tensors[k] for k, v in agent.trainer.snapshot().items()}
    new_global = {k: v + 0.001 for k, v in agent.store.global_version.tensors.items()}
    version = agent.adopt_global(new_global, 3)
    assert agent.store.global_version is version and version.label == "3.0"
    for k, v in agent.trainer.snapshot().items():
        assert torch.allclose(v, new_global[k] + progress[k], atol=1e-6)
    # G' + local progress went live at once when it is better locally than G' alone, else G' stays.
    served = agent.store.current
    assert served.cluster_version == 3
    if served.revision == 1:
        assert served.eval_loss <= agent.trainer.local_loss(version)
    else:
        assert served is version and agent.trainer.evaluate() > agent.trainer.local_loss(version)
