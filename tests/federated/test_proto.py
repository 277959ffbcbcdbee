"""The committed generated code matches collm.proto."""

from __future__ import annotations

from collm_rpc.proto import generate


def test_generated_code_is_current(tmp_path):
    for fresh in generate.generate(tmp_path):
        committed = generate.PROTO.with_name(fresh.name)
        assert committed.read_text() == fresh.read_text(), f"{committed.name} is stale: run `python -m collm_rpc.proto.generate`"
