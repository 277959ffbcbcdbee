"""The tiny model split at layer 2 of 4, with a LoRA adapter that changes its output; a replica serving it."""

from __future__ import annotations

import pytest
import torch

from collm_rpc import tls
from replica_agent.agent import Agent
from replica_agent.config import AgentConfig
from replica_agent.edge.client import CloudClient, LinkSettings
from replica_agent.edge.exit_head import boundary_and_teacher, init_exit_head
from replica_agent.edge.split import PinnedAdapter, split_model
from replica_agent.engine.llama import KVCache, LlamaRuntime, SlabLora
from replica_agent.engine.lora import ALL_MODULES, LoraSlab, LoraSpec, init_adapter
from replica_agent.serving.grpc_service import serve_grpc

SPLIT = 2
# Eight prompts x 64 tokens: 512 decisions, so 99 % allows five disagreements.
PROMPTS = [
    "The for statement is used to iterate over",
    "A class definition is an executable statement",
    "Names refer to objects. Names are introduced by",
    "The import statement combines two operations",
    "When an exception is raised",
    "Assignment statements are used to",
    "The del statement removes",
    "Comparisons can be chained arbitrarily",
]


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: one-token matmuls of the tiny model gain nothing from a second, and on a
    shared machine waiting for it made these tests ten times slower (measured: 3.7 s against 0.46 s
    for 64 split-decoded tokens). It also keeps float reductions the same on any core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def runtime(tiny_base) -> LlamaRuntime:
    return LlamaRuntime(tiny_base.config, tiny_base.state_dict)


def nonzero_adapter(runtime: LlamaRuntime, seed: int, scale: float = 0.05) -> PinnedAdapter:
    """All seven projections adapted, B small but not zero, so both halves' outputs change."""
    spec = LoraSpec(rank=4, alpha=8, target_modules=ALL_MODULES)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen) * scale if "lora_B" in k else v for k, v in init_adapter(spec, runtime.dims, seed=seed).items()}
    return PinnedAdapter.of(tensors, spec)


@pytest.fixture(scope="session")
def adapter(runtime) -> PinnedAdapter:
    return nonzero_adapter(runtime, seed=7)


@pytest.fixture(scope="session")
def halves(runtime, adapter):
    """(edge, cloud) with an untrained exit head: the logit lens, confident on some tokens only."""
    return split_model(runtime, adapter, SPLIT, init_exit_head(runtime, SPLIT, adapter.sha256))


def serving_lora(runtime: LlamaRuntime, adapter: PinnedAdapter) -> SlabLora | None:
    """The adapter as the engine serves it (a slab slot, B pre-scaled): the whole-model reference."""
    if adapter.spec is None:
        return None
    slab = LoraSlab(adapter.spec, runtime.dims, 1, dtype=runtime.dtype, device=runtime.device)
    slab.load(1, adapter.tensors)
    return SlabLora(slab, [0])


def whole_model_greedy(runtime: LlamaRuntime, adapter: PinnedAdapter, prompt: list[int], new_tokens: int) -> tuple[list[int], KVCache]:
    """What a replica serves: prefill, then greedy decode steps, over all layers."""
    lora = serving_lora(runtime, adapter)
    cache = KVCache(runtime.dims, 1, len(prompt) + new_tokens, dtype=runtime.dtype, device=runtime.device)
    logits = runtime.prefill(prompt, cache, 0, lora)
    tokens = []
    for position in range(len(prompt), len(prompt) + new_tokens):
        tokens.append(int(logits.argmax()))
        if len(tokens) < new_tokens:
            logits = runtime.decode(torch.tensor([tokens[-1]]), torch.tensor([position]), cache, lora)[0]
    return tokens, cache


def whole_model_logits(runtime: LlamaRuntime, adapter: PinnedAdapter, ids: list[int]) -> tuple[torch.Tensor, KVCache]:
    """Next-token logits after every position of `ids` ([T, vocab]) and the whole model's KV."""
    cache = KVCache(runtime.dims, 1, len(ids), dtype=runtime.dtype, device=runtime.device)
    return runtime.prefill(ids, cache, 0, serving_lora(runtime, adapter), all_logits=True), cache


@pytest.fixture(scope="package")
def prompts(tiny_base) -> list[list[int]]:
    return [tiny_base.tokenizer(p)["input_ids"] for p in PROMPTS]


def exit_argmax_after_each_position(runtime: LlamaRuntime, adapter: PinnedAdapter, edge, ids: list[int]) -> list[int]:
    """The exit head's token after every position, recomputed without any cache."""
    boundary, _ = boundary_and_teacher(runtime, adapter.lora(runtime), SPLIT, torch.tensor([ids]))
    return edge.exit_logits(boundary[0]).argmax(-1).tolist()


# -- a replica for edge sessions over gRPC -------------------------------------------------------------
NS, CLUSTER = "team-a", "tiny"
PATIENT = LinkSettings(latency_budget_s=10.0, retry_s=0.0)  # a loaded 2-core box never misses this budget
KV_LIMIT_MB = 2.5  # two sessions of 512 positions (1 MiB of deep KV each on the tiny model), not one of 1024 beside one of 512


@pytest.fixture(scope="package")
def ca():
    return tls.CertificateAuthority.create()


@pytest.fixture(scope="package")
def agent(tiny_base, adapter):
    """A replica (not started: edge sessions need no engine) serving the test adapter, retaining one version only;
    its gRPC port speaks mutual TLS (`address`)."""
    config = AgentConfig(
        model="tiny",
        replica_id="tiny-0",
        lora_rank=4,
        lora_alpha=8,
        train_cap_tokens=0,
        max_total_tokens=128,
        max_batch=1,
        adapter_retain=1,
        edge_max_sessions=2,
        edge_max_kv_mb=KV_LIMIT_MB,
        edge_idle_seconds=30,
    )
    agent = Agent(config, base=tiny_base)
    agent.store.publish(dict(adapter.tensors), cluster_version=1)
    assert agent.store.current.sha256 == adapter.sha256
    return agent


@pytest.fixture(scope="package")
def address(agent, ca):
    server, _, port = serve_grpc(agent, "127.0.0.1", 0, credentials=ca.issue(tls.Identity.replica(NS, CLUSTER, "tiny-0")))
    yield f"127.0.0.1:{port}"
    server.stop(grace=0)


@pytest.fixture(scope="package")
def edge_creds(ca):
    return ca.issue(tls.Identity.edge(NS, CLUSTER, "phone-1"))


def connect(address: str, adapter, creds, settings: LinkSettings = PATIENT) -> CloudClient:
    return CloudClient(address, model="tiny", split=SPLIT, adapter_sha256=adapter.sha256, credentials=creds, settings=settings)
