"""The operator's gRPC side: one client per agent pod, addressed by pod IP (the headless Service's
DNS name when a pod has none yet), reused across control steps while the address holds."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from collm_control.stats import AgentStats
from collm_operator import api, objects
from collm_operator.reconcile import Pod
from collm_rpc import tls
from collm_rpc.client import AgentClient
from collm_rpc.proto import collm_pb2 as pb
from collm_rpc.stats import from_proto

log = logging.getLogger(__name__)


def grpc_addresses(cluster: api.Cluster, pods: Mapping[str, Pod], names: Iterable[str], *, stable: bool = False) -> dict[str, str]:
    """host:port of each named replica's gRPC server: the pod IP, or with `stable` (a round, which
    outlives pods) the pod's name in the headless Service, which follows a replaced pod."""
    out = {}
    for name in names:
        pod = pods.get(name)
        if pod is not None and pod.ip and not stable:
            out[name] = f"{pod.ip}:{api.GRPC_PORT}"
        else:
            out[name] = f"{name}.{objects.headless_service_name(cluster)}.{cluster.namespace}.svc:{api.GRPC_PORT}"
    return out


@dataclass(frozen=True)
class Applied:
    """A plan an agent acknowledged: what it was, at which address, and the agent's uptime then."""

    plan: pb.Plan
    address: str
    uptime_s: float


def holds_plan(applied: Applied | None, plan: pb.Plan, address: str, stats: AgentStats) -> bool:
    """Whether an agent still holds `plan`: it acknowledged that plan at this address and has not
    restarted since (its uptime only grew; a restarted agent starts from its configured defaults)."""
    return applied is not None and applied.plan == plan and applied.address == address and stats.uptime_s >= applied.uptime_s


class AgentPool:
    """`credentials`: the operator's certificate from the installation CA. `active` is what the pool
    presents to the cluster at hand (set per step by certificates.operator_credentials): that
    certificate, one cert-manager issued for the cluster, or None (plaintext, mutualTLS false)."""

    def __init__(self, rpc_timeout_s: float = 5.0, credentials: tls.Credentials | None = None) -> None:
        self.rpc_timeout_s = rpc_timeout_s
        self.credentials = self.active = credentials
        self._clients: dict[str, AgentClient] = {}
        self._applied: dict[str, Applied] = {}

    def client(self, name: str, address: str) -> AgentClient:
        credentials = self.active
        current = self._clients.get(name)
        if current is None or current.address != address or current.credentials is not credentials:
            if current is not None:
                current.close()
            current = self._clients[name] = AgentClient(address, timeout=self.rpc_timeout_s, credentials=credentials)
        return current

    def stats(self, addresses: Mapping[str, str]) -> dict[str, AgentStats | None]:
        """Every agent's stats, None for one that did not answer; in parallel: every call is started,
        then each answer awaited (no thread pool per step: at 100 clusters, starting its threads cost
        a step more than the calls did)."""
        calls = {name: self.client(name, address).stub.GetStats.future(pb.StatsRequest(), timeout=self.rpc_timeout_s) for name, address in addresses.items()}
        out: dict[str, AgentStats | None] = {}
        for name, call in calls.items():
            try:
                out[name] = from_proto(call.result())
            except grpc.RpcError as exc:
                log.debug("%s: GetStats from %s failed: %s", name, addresses[name], exc.code().name)
                out[name] = None
        return out

    def apply_plans(self, plans: Mapping[str, pb.Plan], addresses: Mapping[str, str], stats: Mapping[str, AgentStats]) -> dict[str, str]:
        """Send each agent its plan unless it holds that plan already (holds_plan), in parallel as
        stats() reads. A plan is a setting, not a lease: resending an unchanged one every step cost
        the operator two calls per cluster per step. Returns {agent: error} for the calls that failed."""
        calls = {
            name: self.client(name, addresses[name]).stub.ApplyPlan.future(plan, timeout=self.rpc_timeout_s)
            for name, plan in plans.items()
            if not holds_plan(self._applied.get(name), plan, addresses[name], stats[name])
        }
        failed: dict[str, str] = {}
        for name, call in calls.items():
            try:
                call.result()
            except grpc.RpcError as exc:
                self._applied.pop(name, None)
                failed[name] = exc.code().name
            else:
                self._applied[name] = Applied(plans[name], addresses[name], stats[name].uptime_s)
        return failed

    def forget(self, keep: Iterable[str]) -> None:
        """Close the clients of agents not in `keep`; what they acknowledged is forgotten with them."""
        keep = set(keep)
        for name in [n for n in self._clients if n not in keep]:
            self._clients.pop(name).close()
            self._applied.pop(name, None)

    def close(self) -> None:
        self.forget(())
