"""The CRDs' CEL rules (x-kubernetes-validations), evaluated with a real CEL implementation (cel-python).

Every rule found in crds/*.yaml must compile, pass on the shipped examples, reject at least one
invalid case of the table below with its own message (and no other rule firing), and accept a
valid neighbour. The objects are defaulted first, as the API server does, and checked against the
structural schema too, so that each invalid case is one that only the CEL rule catches. Transition
rules (`oldSelf`) only run on update. Every invalid case must also be rejected by the operator's own
checks in collm_operator/api.py (which repeat the rules for objects that never went through the
API server) with the same field, and every valid neighbour accepted, so the two cannot drift.

A new rule in a CRD fails test_every_rule_has_cases until it gets cases here; an edited rule fails
until its cases are reviewed (the table quotes each rule's text).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
import yaml

from collm_operator import api
from collm_operator.api import SpecError

from .cel_rules import ROOT, Rule, all_rules, apply_defaults, crd_schemas, evaluate, failures, program, validate
from .test_manifests import to_jsonschema

EXAMPLES = [ROOT / "manifests" / "examples" / name for name in ("collmcluster-cpu-tiny.yaml", "collmcluster-gpu.yaml", "adapterround.yaml")]
BASE = {"CollmCluster": {"model": {"source": "tiny"}}, "AdapterRound": {"clusterRef": {"name": "tiny"}}}  # smallest valid specs
RULES = all_rules()


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = merge(out.get(key), value)
        return out
    return copy.deepcopy(patch)


def resource(kind: str, patch: dict) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": merge(BASE[kind], patch),
    }


def assert_structurally_valid(obj: dict) -> None:
    schema = crd_schemas()[obj["kind"]]
    jsonschema.validate(apply_defaults(obj, schema), to_jsonschema(schema))


# --- the table: per rule, invalid cases and valid neighbours -------------------------------------


@dataclass(frozen=True)
class Case:
    rule: str  # Rule.id
    text: str  # the rule as the CRD has it
    field: str  # the field api.py's SpecError names for the invalid cases
    invalid: tuple  # spec patches; for a transition rule (old patch, new patch) pairs
    valid: tuple  # same shape: neighbours that every rule accepts

    @property
    def kind(self) -> str:
        return self.rule.split(".", 1)[0]


TINY, SMOLLM2 = {"model": {"source": "tiny"}}, {"model": {"source": "smollm2"}}
TWO = ["tiny-0", "tiny-1"]

CASES = [
    Case(
        "CollmCluster.spec#0",
        "!self.federation.enabled || self.federation.minParticipants <= self.replicas",
        "spec.federation.minParticipants",
        invalid=({"replicas": 3, "federation": {"minParticipants": 5}}, {"replicas": 1}),  # the second by defaults (minParticipants 2)
        valid=(
            {"replicas": 5, "federation": {"minParticipants": 5}},
            {"replicas": 1, "federation": {"enabled": False}},
            {"replicas": 1, "federation": {"minParticipants": 1}},
        ),
    ),
    Case(
        "CollmCluster.spec#1",
        "self.scheduling.policy != 'separated' || self.replicas >= 2",
        "spec.scheduling.policy",
        invalid=({"replicas": 1, "federation": {"enabled": False}, "scheduling": {"policy": "separated"}},),
        valid=({"replicas": 2, "scheduling": {"policy": "separated"}}, {"replicas": 1, "federation": {"enabled": False}, "scheduling": {"policy": "static"}}),
    ),
    Case(
        "CollmCluster.spec.model.source#0",
        "self == oldSelf",
        "spec.model.source",
        invalid=((TINY, SMOLLM2), (TINY, {"model": {"source": "/models/tiny"}})),
        valid=((TINY, {"model": {"source": "tiny", "dtype": "float16"}}), (TINY, {"replicas": 4}), (SMOLLM2, SMOLLM2)),
    ),
    Case(
        "CollmCluster.spec.training.learningRate#0",
        "double(self) > 0.0",
        "spec.training.learningRate",
        invalid=tuple({"training": {"learningRate": lr}} for lr in ("0", "0.0", ".0", "0e-3", "00")),  # all match the pattern
        valid=tuple({"training": {"learningRate": lr}} for lr in ("1e-3", ".5", "1.", "2.5E-4", "3")),
    ),
    Case(
        "CollmCluster.spec.federation#0",
        "!self.secureAggregation || self.aggregation == 'fedavg'",
        "spec.federation.secureAggregation",
        invalid=tuple({"federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "aggregation": a}} for a in ("median", "ffa")),
        valid=(
            {"federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "aggregation": "fedavg"}},
            {"federation": {"aggregation": "median"}},
        ),
    ),
    Case(
        "CollmCluster.spec.federation#1",
        "self.noiseMultiplier == '' || self.clipNorm != ''",
        "spec.federation.noiseMultiplier",
        invalid=({"federation": {"noiseMultiplier": "0.5"}}, {"federation": {"noiseMultiplier": "0.5", "clipNorm": ""}}),
        valid=({"federation": {"noiseMultiplier": "0.5", "clipNorm": "1.0"}}, {"federation": {"clipNorm": "1.0"}}),
    ),
    Case(
        "CollmCluster.spec.federation#2",
        "self.noiseMultiplier == '' || self.aggregation in ['fedavg', 'ffa']",
        "spec.federation.noiseMultiplier",
        invalid=tuple({"federation": {"noiseMultiplier": "0.5", "clipNorm": "1", "aggregation": a}} for a in ("median", "trimmedMean")),
        valid=({"federation": {"noiseMultiplier": "0.5", "clipNorm": "1", "aggregation": "ffa"}}, {"federation": {"clipNorm": "1", "aggregation": "median"}}),
    ),
    Case(
        "CollmCluster.spec.federation#3",
        "self.deadlineSeconds <= self.roundIntervalSeconds",
        "spec.federation.deadlineSeconds",
        invalid=({"federation": {"deadlineSeconds": 400}}, {"federation": {"roundIntervalSeconds": 60}}),  # the second by defaults (deadline 120)
        valid=({"federation": {"deadlineSeconds": 300}}, {"federation": {"roundIntervalSeconds": 60, "deadlineSeconds": 60}}),
    ),
    Case(
        "CollmCluster.spec.federation#4",
        "!self.secureAggregation || self.noiseMultiplier == ''",
        "spec.federation.noiseMultiplier",
        invalid=({"federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "noiseMultiplier": "0.5", "clipNorm": "1"}},),
        valid=(
            {"federation": {"secureAggregation": True, "secureAggregationSecretRef": "s", "clipNorm": "1"}},
            {"federation": {"noiseMultiplier": "0.5", "clipNorm": "1"}},
        ),
    ),
    Case(
        "CollmCluster.spec.federation#5",
        "self.epsilonBudget == '' || self.noiseMultiplier != ''",
        "spec.federation.epsilonBudget",
        invalid=({"federation": {"epsilonBudget": "8"}}, {"federation": {"epsilonBudget": "8", "clipNorm": "1"}}),
        valid=({"federation": {"epsilonBudget": "8", "noiseMultiplier": "1.0", "clipNorm": "1"}}, {"federation": {"noiseMultiplier": "1.0", "clipNorm": "1"}}),
    ),
    Case(
        "CollmCluster.spec.federation.privacyDelta#0",
        "double(self) > 0.0 && double(self) < 1.0",
        "spec.federation.privacyDelta",
        invalid=tuple({"federation": {"privacyDelta": d}} for d in ("0", "1", "1.5", "2e0")),
        valid=tuple({"federation": {"privacyDelta": d}} for d in ("1e-5", ".5", "0.999")),
    ),
    Case(
        "CollmCluster.spec.state#0",
        "self == oldSelf",
        "spec.state",
        invalid=(({}, {"state": {"volume": "EmptyDir"}}), ({"state": {"size": "1Gi"}}, {"state": {"size": "2Gi"}})),
        valid=(({}, {"replicas": 4}), ({"state": {"size": "2Gi"}}, {"state": {"size": "2Gi"}, "replicas": 3})),
    ),
    Case(
        "CollmCluster.spec.federation.clipNorm#0",
        "self == '' || double(self) > 0.0",
        "spec.federation.clipNorm",
        invalid=tuple({"federation": {**{}, "clipNorm": z}} for z in ("0", "0.0", "00", "0e5")),
        valid=tuple({"federation": {**{}, "clipNorm": v}} for v in ("1.0", ".5")),
    ),
    Case(
        "CollmCluster.spec.federation.noiseMultiplier#0",
        "self == '' || double(self) > 0.0",
        "spec.federation.noiseMultiplier",
        invalid=tuple({"federation": {**{"clipNorm": "1"}, "noiseMultiplier": z}} for z in ("0", "0.0", "00", "0e5")),
        valid=tuple({"federation": {**{"clipNorm": "1"}, "noiseMultiplier": v}} for v in ("0.5", ".5")),
    ),
    Case(
        "CollmCluster.spec.federation.epsilonBudget#0",
        "self == '' || double(self) > 0.0",
        "spec.federation.epsilonBudget",
        invalid=tuple({"federation": {**{"clipNorm": "1", "noiseMultiplier": "1"}, "epsilonBudget": z}} for z in ("0", "0.0", "00", "0e5")),
        valid=tuple({"federation": {**{"clipNorm": "1", "noiseMultiplier": "1"}, "epsilonBudget": v}} for v in ("8", ".5")),
    ),
    Case(
        "AdapterRound.spec#0",
        "!has(self.participants) || !has(self.minParticipants) || self.minParticipants <= size(self.participants)",
        "spec.minParticipants",
        invalid=({"minParticipants": 3, "participants": TWO}, {"minParticipants": 1, "participants": []}),
        valid=({"minParticipants": 2, "participants": TWO}, {"minParticipants": 3}, {"participants": ["tiny-0"]}),
    ),
    Case(
        "AdapterRound.spec.clusterRef#0",
        "self == oldSelf",
        "spec.clusterRef",
        invalid=(({}, {"clusterRef": {"name": "smollm2"}}),),
        valid=(({}, {"localSteps": 5}), ({"participants": TWO}, {"participants": ["tiny-0"]})),
    ),
]
BY_RULE = {case.rule: case for case in CASES}


def rule_of(case: Case) -> Rule:
    (rule,) = [r for r in RULES if r.id == case.rule]
    return rule


def objects(case: Case, patch) -> tuple[dict, dict | None]:
    """(new, old) resources of a table entry; old is None for a create."""
    if rule_of(case).transition:
        old_patch, new_patch = patch
        return resource(case.kind, new_patch), resource(case.kind, old_patch)
    return resource(case.kind, patch), None


def entries(which: str) -> list:
    return [
        pytest.param(case, patch, id=f"{case.rule}-{which}{i}")
        for case in CASES
        if case.rule in {r.id for r in RULES}
        for i, patch in enumerate(getattr(case, which))
    ]


# --- the rules -----------------------------------------------------------------------------------


def test_rules_are_found_in_both_crds():
    assert set(crd_schemas()) == {"CollmCluster", "AdapterRound"}
    for kind in crd_schemas():
        assert [r for r in RULES if r.kind == kind], f"no x-kubernetes-validations found in the {kind} CRD"
    assert {r.id for r in RULES if r.transition} == {"CollmCluster.spec.model.source#0", "CollmCluster.spec.state#0", "AdapterRound.spec.clusterRef#0"}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_every_rule_compiles(rule):
    program(rule.rule)  # raises celpy.CELParseError
    assert rule.message, f"{rule.id}: a rule without a message"


def test_every_rule_has_cases():
    """A rule added to a CRD needs an invalid case and a valid neighbour here; a changed rule a review."""
    found = {r.id: r for r in RULES}
    assert sorted(found) == sorted(BY_RULE), (
        "rules without cases (left) or cases without rules (right): " + f"{sorted(set(found) - set(BY_RULE))} vs {sorted(set(BY_RULE) - set(found))}"
    )
    assert len(CASES) == len(BY_RULE) == len(RULES)
    for case in CASES:
        assert case.text == found[case.rule].rule, f"{case.rule} changed: review its cases, then update the text"
        assert case.invalid and case.valid, f"{case.rule} needs at least one invalid case and one valid neighbour"


# --- examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_every_rule(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or not doc["apiVersion"].startswith("collm.io/"):
            continue
        kind = doc["kind"]
        created = validate(kind, doc)
        assert [o for o in created if not o.ok] == []
        assert {o.rule.id for o in created} == {r.id for r in RULES if r.kind == kind and not r.transition}
        updated = validate(kind, doc, old=doc)  # an unchanged update runs the transition rules too
        assert [o for o in updated if not o.ok] == []
        assert {o.rule.id for o in updated} == {r.id for r in RULES if r.kind == kind}


# --- each rule: invalid cases and valid neighbours -----------------------------------------------


@pytest.mark.parametrize("case, patch", entries("invalid"))
def test_rule_rejects_invalid_case(case, patch):
    new, old = objects(case, patch)
    for obj in (new, old) if old is not None else (new,):
        assert_structurally_valid(obj)  # only the CEL rule catches it
    failed = failures(case.kind, new, old)
    assert [(o.rule.id, o.result) for o in failed] == [(case.rule, False)], [(o.rule.id, o.where, o.result, o.error) for o in failed]


@pytest.mark.parametrize("case, patch", entries("valid"))
def test_rule_accepts_valid_neighbour(case, patch):
    new, old = objects(case, patch)
    for obj in (new, old) if old is not None else (new,):
        assert_structurally_valid(obj)
    outcomes = validate(case.kind, new, old)
    assert [(o.rule.id, o.where, o.error) for o in outcomes if not o.ok] == []
    assert case.rule in {o.rule.id for o in outcomes}, f"{case.rule} did not run"


# --- the operator agrees -------------------------------------------------------------------------


def operator_check(kind: str, new: dict, old: dict | None) -> None:
    """What api.py does with the spec: parse it; on update also check the transition."""
    if kind == api.CLUSTER_KIND:
        api.parse_cluster_spec(new["spec"])
        if old is not None:
            api.check_cluster_update(old["spec"], new["spec"])
    else:
        api.parse_round_spec(new["spec"])
        if old is not None:
            api.check_round_update(old["spec"], new["spec"])


def as_submitted(case: Case, patch, defaulted: bool) -> tuple[dict, dict | None]:
    """The case's objects, raw or defaulted as the API server would store them."""
    new, old = objects(case, patch)
    if defaulted:
        schema = crd_schemas()[case.kind]
        new, old = apply_defaults(new, schema), apply_defaults(old, schema) if old is not None else None
    return new, old


@pytest.mark.parametrize("defaulted", [False, True], ids=["raw", "defaulted"])
@pytest.mark.parametrize("case, patch", entries("invalid"))
def test_operator_rejects_invalid_case(case, patch, defaulted):
    new, old = as_submitted(case, patch, defaulted)
    with pytest.raises(SpecError) as info:
        operator_check(case.kind, new, old)
    assert info.value.field == case.field, info.value.message


@pytest.mark.parametrize("defaulted", [False, True], ids=["raw", "defaulted"])
@pytest.mark.parametrize("case, patch", entries("valid"))
def test_operator_accepts_valid_neighbour(case, patch, defaulted):
    new, old = as_submitted(case, patch, defaulted)
    operator_check(case.kind, new, old)


# --- transition rules ----------------------------------------------------------------------------


def test_model_source_is_immutable():
    old, new = resource("CollmCluster", {}), resource("CollmCluster", SMOLLM2)
    (failed,) = failures("CollmCluster", new, old)
    assert (failed.rule.id, failed.where, failed.result) == ("CollmCluster.spec.model.source#0", "spec.model.source", False)
    assert "spec.model.source is immutable" in failed.rule.message
    assert failures("CollmCluster", new) == []  # a create runs no transition rule
    assert failures("CollmCluster", old, old) == []
    assert failures("CollmCluster", resource("CollmCluster", {"replicas": 3}), old) == []


def test_cluster_ref_is_immutable():
    old, new = resource("AdapterRound", {}), resource("AdapterRound", {"clusterRef": {"name": "smollm2"}})
    (failed,) = failures("AdapterRound", new, old)
    assert (failed.rule.id, failed.where, failed.result) == ("AdapterRound.spec.clusterRef#0", "spec.clusterRef", False)
    assert "spec.clusterRef is immutable" in failed.rule.message
    assert failures("AdapterRound", new) == []
    assert failures("AdapterRound", old, old) == []
    assert failures("AdapterRound", resource("AdapterRound", {"localSteps": 9}), old) == []


# --- the harness itself --------------------------------------------------------------------------


def test_defaulting_fills_nested_defaults_under_a_defaulted_object():
    spec = apply_defaults(resource("CollmCluster", {}), crd_schemas()["CollmCluster"])["spec"]
    assert spec["federation"]["evalGate"] == {"toleranceMilliNats": 0}
    assert (spec["replicas"], spec["training"]["learningRate"], spec["scheduling"]["policy"]) == (2, "2e-3", "coexec")
    assert "secureAggregationSecretRef" not in spec["federation"] and "dataVolume" not in spec["training"]


def test_defaulting_agrees_with_the_dev_cluster_emulator():
    from e2e.devcluster.emulator import apply_defaults as emulator_defaults

    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            schema = crd_schemas()[doc["kind"]]
            assert apply_defaults(doc, schema) == emulator_defaults(copy.deepcopy(doc), schema)


def test_an_absent_field_read_without_has_is_an_error_not_a_pass():
    """The API server rejects a request whose rule errors; the harness must not count that as a pass."""
    probe = Rule("AdapterRound", ("spec",), 0, "self.aggregator != ''", "probe")
    spec = {"spec": apply_defaults(resource("AdapterRound", {}), crd_schemas()["AdapterRound"])["spec"]}
    (outcome,) = evaluate(probe, spec)
    assert (outcome.result, outcome.ok) == (None, False) and "error" in outcome.error
    (outcome,) = evaluate(probe, {"spec": {"aggregator": "tiny-0"}})
    assert outcome.ok


@pytest.mark.parametrize("value", ["1e400", "1" * 33])
def test_a_learning_rate_that_would_overflow_a_double_is_refused_by_the_schema_and_the_operator(value):
    # On the API server cel-go's double("1e400") is a range error (cel-python reads inf), so the
    # schema's pattern bounds the exponent and maxLength the digits before any rule runs.
    obj = resource("CollmCluster", {"training": {"learningRate": value}})
    with pytest.raises(jsonschema.ValidationError):
        assert_structurally_valid(obj)
    with pytest.raises(SpecError):
        api.parse_cluster_spec(obj["spec"])
