"""A whole CoLLM cluster in one process: agents (gRPC + HTTP on loopback), the router, the controller.

The agents are the federated LocalCluster's (one shared base model, each agent reached only
through gRPC by the controller and the round driver); each also serves its HTTP API on its own
loopback port, and the router dispatches to those URLs. The controller pushes routing weights
with the router's PUT /admin/weights, as the operator does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from dataclasses import dataclass

from aiohttp import web

from ..config import AgentConfig
from ..engine.data import stdlib_package_dir
from ..engine.model_host import BaseModel, load_base_model
from ..federated.local_cluster import LocalCluster
from ..router.app import ROUTER_KEY, ReplicaEndpoint, create_router_app
from ..serving.background import BackgroundServer
from .controller import Controller, ControllerSettings

# One standard-library package per replica: each replica's private data is a different domain (non-IID).
PACKAGES = ("json", "http", "email", "logging", "urllib", "xml", "unittest", "importlib")


def replica_configs(n: int, *, model: str = "tiny", ttft_ms: int = 1000, tpot_ms: int = 100, **overrides) -> list[AgentConfig]:
    if not 1 <= n <= len(PACKAGES):
        raise ValueError(f"replicas must be between 1 and {len(PACKAGES)} (one standard-library package each)")
    base = dict(model=model, federated=True, port=0, grpc_port=0, ttft_ms=ttft_ms, tpot_ms=tpot_ms, max_total_tokens=512, eval_batches=2, learning_rate=2e-3)
    return [AgentConfig(**{**base, **overrides, "replica_id": f"replica-{i}", "data": str(stdlib_package_dir(PACKAGES[i]))}) for i in range(n)]


class BackgroundRouter:
    """The router's aiohttp app on its own event loop thread."""

    def __init__(self, endpoints: list[ReplicaEndpoint], host: str = "127.0.0.1", **settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="collm-router", daemon=True)
        self.thread.start()
        self.app = create_router_app(endpoints, **settings)
        self.router = self.app[ROUTER_KEY]

        async def start() -> web.AppRunner:
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            return runner

        self.runner = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.url = f"http://{host}:{self.runner.addresses[0][1]}"

    def requests_seen(self) -> int:
        """Requests that reached the router so far (answered, failed, shed or unserved): the cluster's arrivals."""
        total = 0.0
        for metric in (self.router.metrics.requests, self.router.metrics.shed, self.router.metrics.unserved):
            for family in metric.collect():
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        retries = sum(s.value for f in self.router.metrics.retries.collect() for s in f.samples if s.name.endswith("_total"))
        return int(total - retries)  # a retried request ended one failed attempt and will end another

    def put_weights(self, weights: dict[str, float]) -> None:
        body = json.dumps({"weights": weights}).encode()
        request = urllib.request.Request(self.url + "/admin/weights", data=body, method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class LocalDeployment:
    """Everything `collm demo` and the goodput benchmark run: agents, their HTTP servers, router, controller."""

    cluster: LocalCluster
    servers: dict[str, BackgroundServer]
    router: BackgroundRouter
    controller: Controller

    @classmethod
    def start(cls, configs: list[AgentConfig], settings: ControllerSettings, *, base: BaseModel | None = None) -> "LocalDeployment":
        base = base or load_base_model(configs[0].model)
        cluster = LocalCluster(configs, base=base)
        servers: dict[str, BackgroundServer] = {}
        router = None
        try:
            for name, replica in cluster.replicas.items():
                servers[name] = BackgroundServer(replica.agent, "127.0.0.1", 0)
            # Health checks off: the agents live in this process; the controller's weights drain a replica.
            router = BackgroundRouter([ReplicaEndpoint(n, s.url) for n, s in servers.items()], health_interval_s=0, max_outstanding_per_replica=256)
            controller = Controller(cluster.addresses, set_weights=router.put_weights, arrivals=router.requests_seen, settings=settings)
            return cls(cluster, servers, router, controller.start())
        except Exception:
            if router is not None:
                router.stop()
            for server in servers.values():
                server.stop()
            cluster.stop()
            raise

    @property
    def agents(self):
        return {name: r.agent for name, r in self.cluster.replicas.items()}

    def stop(self) -> None:
        self.controller.stop()
        self.router.stop()
        for server in self.servers.values():
            server.stop()
        self.cluster.stop()
