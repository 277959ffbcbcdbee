"""An agent with --state-dir comes back from a restart serving what it served, with its shadow (state.py)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.engine.data import stdlib_package_dir
from replica_agent.engine.requests import SamplingParams
from tests.helpers import eventually

SMALL = {"model": "tiny", "lora_rank": 4, "lora_targets": ["q_proj", "v_proj"], "max_total_tokens": 128}
TRAINING = {**SMALL, "data": str(stdlib_package_dir("json")), "seq_len": 64, "micro_batch": 2, "eval_batches": 1, "learning_rate": 5e-3}


def shifted(tensors, by: float) -> dict[str, torch.Tensor]:
    return {k: v + by for k, v in tensors.items()}


def test_a_restarted_agent_serves_the_same_version_with_the_same_sha256_and_continues_its_shadow(tmp_path, tiny_base):
    config = AgentConfig(**TRAINING, revision_every_seconds=0, adapter_retain=2, state_dir=str(tmp_path), checkpoint_interval_s=0.2)
    agent = Agent(config, base=tiny_base)
    agent.start()
    try:
        federated = agent.adopt_global(shifted(agent.store.global_version.tensors, 0.01), 3)  # as a round's Publish does
        assert eventually(lambda: agent.trainer.step >= 3, timeout=60)
        revision = agent.publish()
        assert revision.label == "3.1"
        assert eventually(lambda: (tmp_path / "shadow.pt").exists(), timeout=30), "the shadow is checkpointed while the agent runs"
        assert eventually(lambda: agent.trainer.step >= revision.step + 2, timeout=60)
    finally:
        agent.stop()
    before = agent.stats()
    shadow, optimizer, step = agent.trainer.snapshot(), agent.trainer.optimizer.state_dict(), agent.trainer.step

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["current"]["version"], manifest["current"]["sha256"], manifest["global"]["version"]) == ("3.1", revision.sha256, "3.0")
    # retention 2: the initial 0.0 left the disk with the store
    assert {p.name for p in (tmp_path / "adapters").iterdir()} == {f"{federated.sha256}.safetensors", f"{revision.sha256}.safetensors"}

    again = Agent(config, base=tiny_base)
    try:
        after = again.stats()
        assert after.adapter == before.adapter and after.adapter.version == "3.1" and after.adapter.sha256 == revision.sha256
        assert after.global_adapter == before.global_adapter and again.store.current.summary() == revision.summary()  # /info's adapter
        trainer = again.trainer
        assert trainer.step == step and trainer.global_version.sha256 == federated.sha256 and trainer.unuploaded_steps == step
        assert all(torch.equal(v, shadow[k]) for k, v in trainer.snapshot().items())
        restored = trainer.optimizer.state_dict()
        assert all(torch.equal(restored["state"][i][name], t) for i, s in optimizer["state"].items() for name, t in s.items())
        assert restored["state"][0]["step"] == step
        again.start()
        _, final = again.engine.generate(again.engine.encode("import json\n"), SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert (final.adapter_version, final.adapter_sha256) == ("3.1", revision.sha256)
        assert again.publish().label == "3.2"  # the next revision gets the next label, never a second 3.1
    finally:
        again.stop()


@pytest.mark.parametrize(
    "damaged, damage, serves",
    [("global", "truncated", "0.0"), ("global", "another adapter's bytes", "0.0"), ("revision", "truncated", "5.0")],
)
def test_a_corrupt_adapter_file_is_skipped_with_a_clear_message(tmp_path, tiny_base, caplog, damaged, damage, serves):
    config = AgentConfig(**SMALL, state_dir=str(tmp_path))
    agent = Agent(config, base=tiny_base)
    initial = agent.store.current
    versions = {"global": agent.adopt_global(shifted(initial.tensors, 0.01), 5)}
    versions["revision"] = agent.store.publish(shifted(initial.tensors, 0.02))
    agent.stop()
    path = tmp_path / "adapters" / f"{versions[damaged].sha256}.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        shutil.copyfile(tmp_path / "adapters" / f"{initial.sha256}.safetensors", path)

    with caplog.at_level(logging.ERROR, logger="replica_agent.engine.state"):
        again = Agent(config, base=tiny_base)
    served = again.store.current
    assert served.label == serves and served.sha256 == (initial if serves == "0.0" else versions["global"]).sha256
    assert f"saved adapter {versions[damaged].label} ({versions[damaged].sha256[:12]})" in caplog.text and "unusable" in caplog.text
    assert not path.exists(), "the damaged file leaves the disk with the next save"


@pytest.mark.parametrize("damage", ["not a checkpoint", "a changed optimizer moment"])
def test_a_corrupt_shadow_checkpoint_starts_the_shadow_from_the_global(tmp_path, tiny_base, caplog, damage):
    config = AgentConfig(**TRAINING, state_dir=str(tmp_path))
    agent = Agent(config, base=tiny_base)
    agent.trainer.train_step()
    agent.trainer.train_step()
    agent.stop()  # the shutdown checkpoint
    saved = torch.load(tmp_path / "shadow.pt", weights_only=True)
    assert saved["step"] == 2
    if damage == "not a checkpoint":
        (tmp_path / "shadow.pt").write_bytes(b"not a checkpoint")
    else:  # a flipped byte inside a tensor: torch.load reads it without complaint
        saved["optimizer"]["state"][0]["exp_avg"][0, 0] += 1.0
        torch.save(saved, tmp_path / "shadow.pt")
    with caplog.at_level(logging.ERROR, logger="replica_agent.engine.state"):
        again = Agent(config, base=tiny_base)
    assert again.trainer.step == 0 and again.store.current.sha256 == agent.store.current.sha256
    assert "shadow checkpoint" in caplog.text and "unusable" in caplog.text


def test_a_state_saved_for_another_lora_shape_is_ignored(tmp_path, tiny_base, caplog):
    agent = Agent(AgentConfig(**SMALL, state_dir=str(tmp_path)), base=tiny_base)
    agent.adopt_global(shifted(agent.store.current.tensors, 0.01), 5)
    agent.stop()
    with caplog.at_level(logging.ERROR, logger="replica_agent.engine.state"):
        again = Agent(AgentConfig(**{**SMALL, "lora_rank": 8}, state_dir=str(tmp_path)), base=tiny_base)
    assert again.store.current.label == "0.0"
    assert "saved for another model or LoRA shape: lora {'rank': 4" in caplog.text and "ignoring it" in caplog.text
    assert json.loads((tmp_path / "manifest.json").read_text())["identity"]["lora"]["rank"] == 8


def test_without_a_state_dir_the_agent_keeps_everything_in_memory(tmp_path, tiny_base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    agent = Agent(AgentConfig(**SMALL), base=tiny_base)
    agent.adopt_global(shifted(agent.store.current.tensors, 0.01), 5)
    agent.stop()
    assert agent.state is None and not list(tmp_path.iterdir())


def test_collm_agent_help_lists_the_state_settings(capsys):
    from replica_agent.cli import agent_main

    with pytest.raises(SystemExit) as exc:
        agent_main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--state-dir STATE_DIR" in text and "COLLM_STATE_DIR" in text
    assert "--checkpoint-interval-s CHECKPOINT_INTERVAL_S" in text and "COLLM_CHECKPOINT_INTERVAL_S; default 60.0" in text


def test_an_unusable_state_dir_stops_collm_agent_with_a_message(tmp_path, tiny_model_dir, capsys):
    from replica_agent.cli import agent_main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert agent_main(["--state-dir", str(blocker / "state"), "--port", "0", "--grpc-port", "0"]) == 2
    assert f"cannot use state_dir {blocker / 'state'}" in capsys.readouterr().err


def test_a_state_volume_that_takes_no_write_shows_in_the_stats_until_a_write_works(tmp_path, tiny_base, monkeypatch):
    from replica_agent.engine import state

    agent = Agent(AgentConfig(**TRAINING, revision_every_seconds=0, state_dir=str(tmp_path)), base=tiny_base)
    assert agent.stats().state_error == ""

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(state, "write_atomically", full)
        agent.adopt_global(shifted(agent.store.global_version.tensors, 0.01), 1)  # served, but not saved
        assert not agent.state.save_shadow(agent.trainer)
        error = agent.stats().state_error
        assert "cannot save the adapter versions" in error and "cannot checkpoint the shadow" in error and "No space left on device" in error
        assert agent.store.current.label == "1.0"  # serving goes on
    agent.adopt_global(shifted(agent.store.global_version.tensors, 0.02), 2)
    assert agent.state.save_shadow(agent.trainer)
    assert agent.stats().state_error == ""  # the volume took both writes again
