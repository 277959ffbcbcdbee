"""Exit heads: the calibration measure, temperature fitting, save/load, and what distillation buys."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from replica_agent.edge.exit_head import (
    ExitHead,
    boundary_and_teacher,
    evaluate_exit_head,
    exit_metrics,
    expected_calibration_error,
    fit_temperature,
    init_exit_head,
    train_exit_head,
)
from replica_agent.edge.split import PinnedAdapter
from replica_agent.engine.tiny import prose_documents

from .conftest import SPLIT, nonzero_adapter


def test_expected_calibration_error():
    # 10 tokens at confidence 0.75 of which 3 are right (0.45 off), 10 at 0.95 all right (0.05 off).
    confidence = torch.tensor([0.75] * 10 + [0.95] * 10)
    correct = torch.tensor([True] * 3 + [False] * 7 + [True] * 10)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    assert expected_calibration_error(torch.tensor([0.7] * 10), torch.tensor([True] * 7 + [False] * 3)) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(expected_calibration_error(torch.tensor([]), torch.tensor([], dtype=torch.bool)))


def test_fit_temperature_recovers_the_temperature_that_sharpened_the_logits():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(8000, 20, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=gen)[:, 0]
    assert fit_temperature(true_logits * 3, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits / 2, labels) == pytest.approx(0.5, rel=0.1)


def test_exit_metrics_compare_argmaxes_and_confidence_per_threshold():
    head = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 5.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    m = exit_metrics(head, teacher, thresholds=(0.9,))
    assert (m.tokens, m.accuracy) == (3, pytest.approx(1 / 3))
    assert m.exit_rate[0.9] == pytest.approx(2 / 3) and m.exit_accuracy[0.9] == pytest.approx(0.5)


def test_an_untrained_head_is_the_logit_lens(runtime, adapter):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    boundary, _ = boundary_and_teacher(runtime, adapter.lora(runtime), SPLIT, ids)
    head = init_exit_head(runtime, SPLIT, adapter.sha256)
    assert torch.allclose(head.logits(runtime, boundary), runtime.logits(runtime.norm(boundary)), atol=1e-5)


def test_save_and_load_keep_the_head_and_its_adapter_version(tmp_path, runtime, adapter):
    gen = torch.Generator().manual_seed(1)
    head = init_exit_head(runtime, SPLIT, adapter.sha256)
    head = ExitHead(SPLIT, adapter.sha256, head.norm, head.a, torch.randn(head.b.shape, generator=gen), temperature=0.625)
    head.save(tmp_path / "head.safetensors")
    loaded = ExitHead.load(tmp_path / "head.safetensors", adapter_sha256=adapter.sha256)
    assert (loaded.split, loaded.adapter_sha256, loaded.temperature) == (SPLIT, adapter.sha256, 0.625)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), head.parameters()))
    with pytest.raises(ValueError, match="belongs to adapter"):
        ExitHead.load(tmp_path / "head.safetensors", adapter_sha256=nonzero_adapter(runtime, seed=8).sha256)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not an exit head"):
        ExitHead.load(tmp_path / "other.safetensors")


def test_training_refuses_to_continue_a_head_of_another_version(tiny_base, runtime, adapter):
    head = init_exit_head(runtime, SPLIT, PinnedAdapter.base().sha256)
    with pytest.raises(ValueError, match="another split or adapter"):
        train_exit_head(runtime, adapter, ["x" * 4000], 1, tokenizer=tiny_base.tokenizer, split=SPLIT, head=head)


def test_distillation_makes_the_exit_agree_with_the_whole_model_and_temperature_calibrates_it(tiny_base, runtime):
    """Prints the figures of docs/cloud-edge.md: pytest tests/edge/test_exit_head.py -k distillation -s"""
    base = PinnedAdapter.base()
    train, held_out = prose_documents("train")[:40], prose_documents("eval")
    kwargs = {"tokenizer": tiny_base.tokenizer, "seq_len": 128}
    lens = init_exit_head(runtime, SPLIT, base.sha256)
    head = train_exit_head(runtime, base, train, 120, tokenizer=tiny_base.tokenizer, split=SPLIT, batch_size=2, seq_len=64)
    rows = {
        "logit lens (before)": evaluate_exit_head(runtime, base, lens, held_out, **kwargs),
        "distilled, T=1": evaluate_exit_head(runtime, base, dataclasses.replace(head, temperature=1.0), held_out, **kwargs),
        f"distilled, T={head.temperature:.3f}": evaluate_exit_head(runtime, base, head, held_out, **kwargs),
    }
    print(f"\nexit head at layer {SPLIT} of {runtime.dims.layers}, tiny model, {rows['logit lens (before)'].tokens} held-out tokens")
    for name, m in rows.items():
        at = " ".join(f"p>={t}: {m.exit_rate[t]:.1%} exit, {m.exit_accuracy[t]:.1%} right;" for t in m.exit_rate)
        print(f"{name:>22}: accuracy {m.accuracy:.3f}  ECE {m.ece:.3f}  {at}")
    before, distilled, calibrated = rows.values()
    assert calibrated.accuracy == distilled.accuracy  # a temperature never changes the argmax
    assert distilled.accuracy > before.accuracy + 0.03
    assert calibrated.ece < distilled.ece / 2 and calibrated.ece < 0.1
    assert calibrated.exit_rate[0.8] > before.exit_rate[0.8] and calibrated.exit_accuracy[0.8] > before.exit_accuracy[0.8]
