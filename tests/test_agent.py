"""One agent on the tiny pretrained model: training under load, plans, and its settings."""

from __future__ import annotations

import threading
import time

import pytest

from replica_agent.agent import Agent, Plan
from replica_agent.config import AgentConfig, deprecated_settings, load_config
from replica_agent.engine.data import stdlib_package_dir
from replica_agent.engine.families import FAMILIES
from replica_agent.engine.requests import FinishReason, SamplingParams


def test_training_under_load_lowers_the_eval_loss_of_published_versions():
    agent = Agent(AgentConfig(model="tiny", data=str(stdlib_package_dir("json")), eval_batches=4, max_total_tokens=256, learning_rate=5e-3))
    first = agent.start()
    finals, stop = [], threading.Event()

    def client(seed):
        i = 0
        while not stop.is_set():
            i += 1
            _, final = agent.engine.generate(agent.engine.encode(f"def handler_{seed}_{i}("), SamplingParams(max_new_tokens=16, ignore_eos=True))
            finals.append(final)

    clients = [threading.Thread(target=client, args=(s,)) for s in range(3)]
    try:
        for t in clients:
            t.start()
        versions = [first]
        for target_steps in (20, 40):
            deadline = time.monotonic() + 90
            while agent.trainer.step < target_steps and time.monotonic() < deadline:
                time.sleep(0.1)
            versions.append(agent.publish())
    finally:
        stop.set()
        for t in clients:
            t.join(30)
        agent.stop()
    losses = [v.eval_loss for v in versions]
    assert agent.trainer.step >= 40, f"the trainer made only {agent.trainer.step} steps under load"
    assert losses[2] < losses[1] < losses[0] and losses[0] - losses[2] > 0.1, losses
    assert finals and all(f.finish_reason is FinishReason.LENGTH for f in finals)
    assert {f.adapter_version for f in finals} >= {"0.0"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_serves_and_trains_in_the_agent(family):
    agent = Agent(AgentConfig(model=f"random:{family}", data=str(stdlib_package_dir("json")), eval_batches=2, max_total_tokens=256, learning_rate=5e-3))
    first = agent.start()
    try:
        _, before = agent.engine.generate(agent.engine.encode("import json\n"), SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert before.finish_reason is FinishReason.LENGTH and before.adapter_version == "0.0"
        deadline = time.monotonic() + 60
        while agent.trainer.step < 15 and time.monotonic() < deadline:
            time.sleep(0.05)
        trained = agent.publish()
        _, after = agent.engine.generate(agent.engine.encode("import json\n"), SamplingParams(max_new_tokens=8, ignore_eos=True))
    finally:
        agent.stop()
    assert agent.stats().model == f"random-{family}"
    assert trained.eval_loss < first.eval_loss, (first.eval_loss, trained.eval_loss)
    assert after.adapter_version == trained.label


def test_plan_updates_the_mixer_cap_and_slo():
    agent = Agent(AgentConfig(model="tiny"))
    agent.apply_plan(Plan(train_cap_tokens=64, ttft_ms=200, tpot_ms=20))
    settings = agent.mixer.settings
    assert (settings.cap_tokens_per_iteration, settings.ttft_ms, settings.tpot_ms) == (0, 200, 20)  # no data: no training
    assert agent.engine.settings.ttft_slo_ms == 200  # admission sheds against the new SLO
    with pytest.raises(RuntimeError, match="--data"):
        agent.publish()


def test_an_empty_data_folder_serves_without_training_and_says_why(tmp_path, tiny_base):
    """A fresh data volume is empty: the replica serves, reports the reason, and trains nothing."""
    agent = Agent(AgentConfig(model="tiny", data=str(tmp_path)), base=tiny_base)
    assert agent.trainer is None and not agent.training
    agent.apply_plan(Plan(train_cap_tokens=64, ttft_ms=200, tpot_ms=20))
    assert agent.mixer.settings.cap_tokens_per_iteration == 0
    stats = agent.stats()
    assert "empty dataset" in stats.data_error and str(tmp_path) in stats.data_error and stats.eval_loss is None
    with pytest.raises(Exception, match="does not exist"):  # a wrong path still fails loudly
        Agent(AgentConfig(model="tiny", data=str(tmp_path / "missing")), base=tiny_base)


def test_settings_precedence_flags_over_env_over_yaml(tmp_path):
    config_file = tmp_path / "agent.yaml"
    config_file.write_text("max_batch: 4\nttft_ms: 300\nlora_targets: [q_proj, k_proj]\nfeedback: false\n")
    env = {"COLLM_MAX_BATCH": "6", "COLLM_TPOT_MS": "40", "COLLM_FEEDBACK": "true", "COLLM_DATA": "/data"}
    config, _ = load_config(["--config", str(config_file), "--max-batch", "8", "--lora-targets", "q_proj,v_proj,o_proj"], environ=env)
    assert config.max_batch == 8  # flag beats env and file
    assert config.tpot_ms == 40  # env beats default
    assert config.ttft_ms == 300  # file beats default
    assert config.feedback is True and config.data == "/data"
    assert config.lora_targets == ["q_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--max-batch", "zero"], {}, "max_batch"),
        (["--ttft-ms", "-5"], {}, "ttft_ms"),
        ([], {"COLLM_FEEDBACK": "maybe"}, "feedback must be true or false"),
        (["--feedback"], {}, "feedback needs a place to write"),
        (["--no-such-flag"], {}, "unrecognized"),
    ],
)
def test_bad_settings_exit_with_a_message_that_says_what_to_fix(argv, env, words, capsys):
    with pytest.raises(SystemExit) as exc:
        load_config(argv, environ=env)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_the_old_secure_aggregation_secret_setting_still_loads_and_is_only_warned_about(tmp_path):
    """An agent ConfigMap from before per-round keys still starts the agent; the setting does nothing."""
    settings = tmp_path / "agent.yaml"
    settings.write_text("replica_id: tiny-0\nsecure_aggregation_secret_file: /etc/collm/secure-aggregation/secret\n")
    config, _ = load_config(["--config", str(settings)], environ={})
    assert [w for w in deprecated_settings(config) if "secure_aggregation_secret_file is deprecated and ignored" in w]
    assert deprecated_settings(AgentConfig()) == []


def test_help_lists_each_setting_with_its_environment_variable(capsys):
    with pytest.raises(SystemExit):
        load_config(["--help"], environ={})
    text = capsys.readouterr().out
    for flag, env in (("--max-batch", "COLLM_MAX_BATCH"), ("--data", "COLLM_DATA"), ("--revision-every-seconds", "COLLM_REVISION_EVERY_SECONDS")):
        assert flag in text and env in text


def test_capacity_profile_is_measured_online_and_plans_arrive_over_grpc(tiny_base):
    from collm_rpc.client import AgentClient
    from replica_agent.serving.grpc_service import serve_grpc

    agent = Agent(AgentConfig(model="tiny", max_total_tokens=128, tpot_ms=100), base=tiny_base)
    agent.profiler.min_samples = 20
    agent.start()
    server, _, port = serve_grpc(agent)
    try:
        threads = [
            threading.Thread(
                target=lambda: [agent.engine.generate(agent.engine.encode("x = 1"), SamplingParams(max_new_tokens=24, ignore_eos=True)) for _ in range(4)]
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with AgentClient(f"127.0.0.1:{port}") as peer:
            profile = peer.stats().capacity_profile
            assert profile and profile[0].cap == 0 and profile[0].requests_per_s > 0  # no data: level 0, serving only
            peer.apply_plan(32, 400, 40, fixed_training=True)
        assert (agent.mixer.settings.ttft_ms, agent.mixer.settings.tpot_ms, agent.mixer.settings.adaptive) == (400, 40, False)
        assert agent.profiler.tpot_ms == 40
    finally:
        server.stop(grace=0)
        agent.stop()
