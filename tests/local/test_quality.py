"""Per-request quality: each request is scored under exactly the adapter version that served it."""

from __future__ import annotations

import pytest
import torch

from replica_agent.engine.adapter_store import AdapterStore
from replica_agent.engine.archive import AdapterArchive, archive_index
from replica_agent.engine.data import LocalDataset, stdlib_package_dir
from replica_agent.engine.llama import LlamaRuntime, TensorLora
from replica_agent.engine.lora import LoraSpec, init_adapter
from replica_agent.local.quality import RequestScorer, ScoreItem, quality, quality_cdf
from replica_agent.local.traffic import Arrival
from replica_agent.local.workload import build_workload, held_out_windows
from replica_agent.traces import RequestShape

SPEC = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_base):
    """Two published versions in an archive: the initial adapter and a different one."""
    runtime = LlamaRuntime(tiny_base.config, tiny_base.state_dict)
    folder = tmp_path_factory.mktemp("archive")
    store = AdapterStore()
    store.on_change(AdapterArchive(folder, "r0").write)
    first = store.publish(init_adapter(SPEC, runtime.dims, seed=0), cluster_version=0)
    generator = torch.Generator().manual_seed(1)
    second = store.publish({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in first.tensors.items()})
    return folder, first, second, runtime


def test_a_request_is_scored_under_the_version_that_served_it(archive, tiny_base):
    folder, first, second, runtime = archive
    assert {e["version"] for e in archive_index(folder)} == {"0.0", "0.1"}
    tokenizer = tiny_base.tokenizer
    prompt, reference = "import json\ndef load(", tuple(tokenizer.encode("path):\n    return json.loads(path)", add_special_tokens=False))
    scorer = RequestScorer(tiny_base, SPEC, [folder])
    got = scorer.cross_entropy(
        [ScoreItem(1, first.sha256, prompt, reference), ScoreItem(2, second.sha256, prompt, reference), ScoreItem(3, first.sha256, prompt, reference)]
    )

    def direct(version) -> float:  # the same sequence, scored on its own, labels only on the reference
        ids = tokenizer.encode(prompt) + list(reference)
        labels = [-100] * (len(ids) - len(reference)) + list(reference)
        with torch.no_grad():
            return float(runtime.loss(torch.tensor([ids]), torch.tensor([labels]), TensorLora(dict(version.tensors), SPEC, runtime.dims)))

    assert got[1] == pytest.approx(direct(first), rel=1e-5) and got[3] == got[1]
    assert got[2] == pytest.approx(direct(second), rel=1e-5) and abs(got[2] - got[1]) > 1e-3, "a different version gives a different score"
    with pytest.raises(KeyError, match="none of the archives"):
        scorer.cross_entropy([ScoreItem(4, "0" * 64, prompt, reference)])


def test_quality_and_its_cdf():
    assert quality(2.0) == 0.5 and quality(float("nan")) == 0.0 and quality(0.0) == 0.0
    assert quality_cdf([0.4, 0.5, 0.6], [0.3, 0.5, 0.7]) == [1.0, pytest.approx(2 / 3), 0.0]


def test_requests_come_from_held_out_windows_after_the_gate(tiny_base):
    tokenizer = tiny_base.tokenizer
    dataset = LocalDataset.from_path(stdlib_package_dir("json"), tokenizer, seq_len=128)
    all_windows = held_out_windows(dataset, tokenizer, gate_chunks=0, min_tokens=48)
    after_gate = held_out_windows(dataset, tokenizer, gate_chunks=4, min_tokens=48)
    assert 0 < len(after_gate) < len(all_windows) and after_gate == all_windows[len(all_windows) - len(after_gate) :]
    arrivals = [Arrival(0.1 * i, RequestShape(prompt_tokens=p, output_tokens=5)) for i, p in enumerate((20, 60, 500))]
    workload = build_workload(arrivals, {"replica-0": dataset}, tokenizer, gate_chunks=4, reference_tokens=32)
    for arrival, request in zip(arrivals, workload.requests):
        window = after_gate[request.window]
        cut = len(tokenizer.encode(request.prompt, add_special_tokens=False))
        assert request.domain == "replica-0" and len(request.reference) == 32 and request.max_new_tokens == 5
        assert list(request.reference) == window[cut : cut + 32], "the reference is the true continuation of the prompt"
        assert cut == min(arrival.shape.prompt_tokens, len(window) - 32)


def test_home_users_can_be_skewed_between_replicas(tiny_base):
    """`--cluster hetero`: 60% of the requests come from replica-1's users."""
    tokenizer = tiny_base.tokenizer
    dataset = LocalDataset.from_path(stdlib_package_dir("json"), tokenizer, seq_len=128)
    domains = {"replica-0": dataset, "replica-1": dataset}
    arrivals = [Arrival(0.01 * i, RequestShape(prompt_tokens=20, output_tokens=5)) for i in range(1000)]
    skewed = build_workload(arrivals, domains, tokenizer, gate_chunks=4, home_skew={"replica-0": 0.4, "replica-1": 0.6})
    share = sum(r.domain == "replica-1" for r in skewed.requests) / len(arrivals)
    assert share == pytest.approx(0.6, abs=0.04)
    with pytest.raises(ValueError, match="home_skew needs a share"):
        build_workload(arrivals, domains, tokenizer, gate_chunks=4, home_skew={"replica-0": 1.0})
