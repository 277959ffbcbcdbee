"""The two halves together compute the whole model, each with its own KV cache and the adapter."""

from __future__ import annotations

import pytest
import torch

from replica_agent.edge.exit_head import init_exit_head
from replica_agent.edge.split import CloudPartition, EdgePartition, PinnedAdapter, edge_runtime, split_model

from .conftest import SPLIT, nonzero_adapter, whole_model_logits

TOL = 1e-4
TEXT = "The with statement is used to wrap the execution of a block"


def ids_of(tiny_base, text: str = TEXT) -> list[int]:
    return tiny_base.tokenizer(text)["input_ids"]


def test_edge_then_cloud_equals_the_whole_model_and_chunks_add_up(tiny_base, runtime, adapter, halves):
    edge, cloud = halves
    ids = ids_of(tiny_base)
    reference, _ = whole_model_logits(runtime, adapter, ids)
    edge_cache, cloud_cache = edge.new_cache(len(ids)), cloud.new_cache(len(ids))
    cut = 17  # two chunks per half: the second attends to the first through the caches
    states = torch.cat([edge.forward(ids[:cut], 0, edge_cache), edge.forward(ids[cut:], cut, edge_cache)])
    first = cloud.forward(states[:cut], 0, cloud_cache)
    last = cloud.forward(states[cut:], cut, cloud_cache)
    assert (first - reference[cut - 1]).abs().max() < TOL
    assert (last - reference[-1]).abs().max() < TOL
    assert edge_cache.k.shape[0] == SPLIT and cloud_cache.k.shape[0] == runtime.dims.layers - SPLIT


def test_the_adapter_changes_both_halves(tiny_base, runtime, adapter):
    base = PinnedAdapter.base()
    ids = ids_of(tiny_base)
    with_adapter = split_model(runtime, adapter, SPLIT, init_exit_head(runtime, SPLIT, adapter.sha256))
    without = split_model(runtime, base, SPLIT, init_exit_head(runtime, SPLIT, base.sha256))
    states = [edge.forward(ids, 0, edge.new_cache(len(ids))) for edge, _ in (with_adapter, without)]
    assert (states[0] - states[1]).abs().max() > 1e-2
    # The same boundary states through the deep layers with and without the adapter.
    logits = [cloud.forward(states[0], 0, cloud.new_cache(len(ids))) for _, cloud in (with_adapter, without)]
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    # And the adapter's effect on the whole model's greedy tokens shows after the split too.
    ref_with, _ = whole_model_logits(runtime, adapter, ids)
    ref_without, _ = whole_model_logits(runtime, base, ids)
    assert not torch.equal(ref_with.argmax(-1), ref_without.argmax(-1))


def test_an_edge_runtime_holds_only_the_shallow_layers_and_computes_the_same_states(tiny_base, runtime, adapter):
    small = edge_runtime(tiny_base, SPLIT)
    assert small.dims.layers == SPLIT and len(small.layers) == SPLIT
    ids = ids_of(tiny_base)
    head = init_exit_head(runtime, SPLIT, adapter.sha256)
    on_edge = EdgePartition(small, SPLIT, adapter, head)
    on_replica = EdgePartition(runtime, SPLIT, adapter, head)
    a = on_edge.forward(ids, 0, on_edge.new_cache(len(ids)))
    b = on_replica.forward(ids, 0, on_replica.new_cache(len(ids)))
    assert (a - b).abs().max() < TOL
    assert torch.equal(on_edge.exit_logits(a).argmax(-1), on_replica.exit_logits(b).argmax(-1))


def test_partitions_refuse_a_head_of_another_version_or_layer_and_a_bad_split(runtime, adapter):
    other = nonzero_adapter(runtime, seed=8)
    with pytest.raises(ValueError, match="trained for adapter"):
        EdgePartition(runtime, SPLIT, adapter, init_exit_head(runtime, SPLIT, other.sha256))
    with pytest.raises(ValueError, match="reads layer"):
        EdgePartition(runtime, SPLIT, adapter, init_exit_head(runtime, SPLIT + 1, adapter.sha256))
    for split in (0, runtime.dims.layers):
        with pytest.raises(ValueError, match="split"):
            CloudPartition(runtime, split, adapter)
