"""The operator's AgentPool reads every agent's stats in one pass (an agent that does not answer is
None) and sends a plan only to agents that do not hold it already."""

from __future__ import annotations

from concurrent import futures
from dataclasses import replace

import grpc
import pytest

from collm_bench.operator_scale import StandInAgent
from collm_control.stats import AgentStats
from collm_operator.agents import AgentPool, Applied, holds_plan
from collm_rpc.client import plan_message
from collm_rpc.proto import collm_pb2_grpc as pb_grpc
from replica_agent.local.processes import free_port


@pytest.fixture
def stand_in():
    """A stand-in agent on loopback (plaintext) and its port."""
    agent = StandInAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AgentServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield agent, port
    server.stop(grace=None)


def test_stats_of_every_agent_in_one_pass_none_for_one_that_does_not_answer(stand_in):
    agent, port = stand_in
    pool = AgentPool(rpc_timeout_s=2.0)  # no credentials: plaintext
    try:
        addresses = {"a": f"127.0.0.1:{port}", "b": f"127.0.0.1:{port}", "gone": f"127.0.0.1:{free_port()}"}
        stats = pool.stats(addresses)
        assert list(stats) == ["a", "b", "gone"] and stats["gone"] is None
        assert stats["a"] is not None and stats["a"].replica_id == "stand-in" and agent.stats_calls == 2
        first = pool.client("a", addresses["a"])
        pool.stats(addresses)
        assert pool.client("a", addresses["a"]) is first  # the channel is kept from step to step
    finally:
        pool.close()


def test_a_plan_is_sent_once_then_again_only_when_it_changes_or_the_agent_restarted(stand_in):
    agent, port = stand_in
    pool = AgentPool(rpc_timeout_s=2.0)
    try:
        addresses = {"a": f"127.0.0.1:{port}", "b": f"127.0.0.1:{port}", "gone": f"127.0.0.1:{free_port()}"}
        plans = {name: plan_message(64, 500, 50) for name in addresses}
        up = {name: AgentStats(replica_id=name, model="tiny", uptime_s=10.0) for name in addresses}
        assert pool.apply_plans(plans, addresses, up) == {"gone": "UNAVAILABLE"} and agent.plans == 2
        later = {name: replace(st, uptime_s=15.0) for name, st in up.items()}
        assert pool.apply_plans(plans, addresses, later) == {"gone": "UNAVAILABLE"}
        assert agent.plans == 2  # a and b hold it; the unreachable one is tried again
        changed = {**plans, "a": plan_message(0, 500, 50)}
        pool.apply_plans(changed, addresses, later)
        assert agent.plans == 3
        restarted = {**later, "b": replace(later["b"], uptime_s=1.0)}
        pool.apply_plans(changed, addresses, restarted)
        assert agent.plans == 4  # b came back with its configured defaults
        pool.forget(["a"])
        pool.apply_plans({"a": changed["a"], "b": changed["b"]}, addresses, restarted)
        assert agent.plans == 5  # b's acknowledgement went with its client
    finally:
        pool.close()


def test_holds_plan_needs_the_same_plan_address_and_no_restart():
    plan = plan_message(64, 500, 50)
    applied = Applied(plan, "10.0.0.1:9090", uptime_s=100.0)
    st = AgentStats(replica_id="a", model="tiny", uptime_s=105.0)
    assert holds_plan(applied, plan, "10.0.0.1:9090", st)
    assert not holds_plan(None, plan, "10.0.0.1:9090", st)
    assert not holds_plan(applied, plan_message(32, 500, 50), "10.0.0.1:9090", st)
    assert not holds_plan(applied, plan, "10.0.0.2:9090", st)  # a new pod
    assert not holds_plan(applied, plan, "10.0.0.1:9090", replace(st, uptime_s=3.0))  # restarted in place
