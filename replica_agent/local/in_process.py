"""Several agents in one process, each with its own gRPC server on loopback (tests, benchmarks, demo).

Every replica is a full agent (engine, trainer, store) reached only through gRPC by the round
driver, exactly as in a cluster; only the process boundary is missing. One base model is loaded
once and shared read-only (each agent builds its own runtime over the same tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from collm_rpc import tls

from ..agent import Agent
from ..config import AgentConfig
from ..engine.model_host import BaseModel, load_base_model
from ..serving.grpc_service import AgentService, serve_grpc


@dataclass
class LocalReplica:
    name: str
    agent: Agent
    server: grpc.Server
    service: AgentService
    address: str

    def kill(self) -> None:
        """Stop answering at once, as a dead pod would (the gRPC server first, then the agent)."""
        self.server.stop(grace=0)
        self.agent.stop()


LOCAL_NAMESPACE, LOCAL_CLUSTER = "local", "local"  # in-process replicas' identity: ns/local/cluster/local/replica/<id>


class LocalCluster:
    def __init__(
        self,
        configs: list[AgentConfig],
        *,
        base: BaseModel | None = None,
        host: str = "127.0.0.1",
        ca: tls.CertificateAuthority | None = None,
        namespace: str = LOCAL_NAMESPACE,
        cluster: str = LOCAL_CLUSTER,
    ) -> None:
        """`ca`: serve every replica with mutual TLS, each with a certificate of its own from that CA."""
        self.base = base or load_base_model(configs[0].model, dtype=configs[0].dtype, device=configs[0].device)
        self.replicas: dict[str, LocalReplica] = {}
        try:
            for config in configs:
                agent = Agent(config, base=self.base)
                agent.start()
                creds = ca.issue(tls.Identity.replica(namespace, cluster, config.replica_id)) if ca is not None else None
                server, service, port = serve_grpc(agent, host, 0, credentials=creds)
                self.replicas[config.replica_id] = LocalReplica(config.replica_id, agent, server, service, f"{host}:{port}")
        except Exception:
            self.stop()
            raise

    @property
    def addresses(self) -> dict[str, str]:
        return {name: r.address for name, r in self.replicas.items()}

    def __getitem__(self, name: str) -> LocalReplica:
        return self.replicas[name]

    def stop(self) -> None:
        for replica in self.replicas.values():
            replica.server.stop(grace=0)
            replica.agent.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
