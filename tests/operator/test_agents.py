"""The operator's AgentPool reads every agent's stats in one pass: an agent that does not answer is None."""

from __future__ import annotations

from concurrent import futures

import grpc

from collm_bench.operator_scale import StandInAgent
from collm_operator.agents import AgentPool
from collm_rpc.proto import collm_pb2_grpc as pb_grpc
from replica_agent.local.processes import free_port


def test_stats_of_every_agent_in_one_pass_none_for_one_that_does_not_answer():
    agent = StandInAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AgentServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
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
        server.stop(grace=None)
