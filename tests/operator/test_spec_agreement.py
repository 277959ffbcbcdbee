"""Generated CollmCluster and AdapterRound specs, judged twice: by the CRD as the API server judges
(null fields pruned, defaults applied, the structural schema, then the CEL rules: cel_rules.py) and by
the operator (api.parse_*_spec, plus check_*_update on an update). Both must agree on accept or
reject for every case, on the spec as written and on the spec as the API server stores it; and the
operator must never fail with anything but a SpecError.

test_cel.py checks each rule on a hand-made table; this checks every field and rule at once on
specs drawn from the CRDs' own schemas, so a field added to a CRD is covered without a new case. A
spec is valid field by field (each field absent or inside its bounds, enum or pattern; the CEL rules
decide), or has about one field in ten just outside (a bound +-1, one item or character too many, a
wrong type, null), or is valid but for one field set to an edge value (then the verdicts hinge on
it). Small numbers and the numeric strings the rules read are favoured, so that the cross-field
rules fire often. The disagreements found so far are GAPS, each pinned by a strict xfail case.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collm_operator import api
from collm_operator.api import SpecError

from .cel_rules import apply_defaults, crd_schemas, failures
from .test_cel import merge, operator_check
from .test_manifests import to_jsonschema

KINDS = (api.CLUSTER_KIND, api.ROUND_KIND)
INVALID_ONE_IN = 10
# Numeric strings as the rules and the operator read them: zeros in every spelling, around 1, extremes.
NUMBERS = ("", "0", "00", "0.0", ".0", "0e5", "0.", "1", "1.", ".5", "1e-5", "2e-3", "1E99", "1e-99", "0.999", "1.0", "1.5")
WRONG_TYPES = ("x", "", 1, 0, 1.5, True, False, [], {})
SHORT = settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the two judges -------------------------------------------------------------------------------


@functools.cache
def spec_schema(kind: str) -> dict:
    return crd_schemas()[kind]["properties"]["spec"]


@functools.cache
def structural_validator(kind: str) -> jsonschema.protocols.Validator:
    """What the API server validates with: to_jsonschema's schema, where a list of type set also has no duplicates."""
    schema = to_jsonschema(_sets_unique(crd_schemas()[kind]))
    return jsonschema.validators.validator_for(schema)(schema)


def _sets_unique(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_sets_unique(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _sets_unique(v) for k, v in schema.items()}
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def resource(kind: str, spec: Any) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": kind, "metadata": {"name": "tiny", "namespace": "default"}, "spec": spec}


def pruned(value: Any) -> Any:
    """Without null fields: the API server prunes them (none of these fields is nullable), then defaults."""
    if isinstance(value, dict):
        return {k: pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [pruned(v) for v in value]
    return value


def stored(kind: str, spec: Any) -> Any:
    """The spec as the API server stores it (what kopf hands the operator)."""
    return apply_defaults(pruned(resource(kind, spec)), crd_schemas()[kind])["spec"]


@dataclass(frozen=True)
class Refusal:
    """Why the API server refuses an object: a schema keyword where it fails, or a CEL rule."""

    keyword: str  # e.g. maxLength, type, required; "rule" for a CEL rule
    where: str  # e.g. spec.model.source, or the rule's id
    value: Any = None


def crd_refusals(kind: str, spec: Any, old: Any = None) -> list[Refusal]:
    new = pruned(resource(kind, spec))
    schema_errors = [
        Refusal(e.validator, ".".join(map(str, e.absolute_path)), e.instance)
        for e in structural_validator(kind).iter_errors(apply_defaults(new, crd_schemas()[kind]))
    ]
    if schema_errors:  # the rules are not run on what the schema refuses (they may not even evaluate)
        return schema_errors
    return [Refusal("rule", o.rule.id) for o in failures(kind, new, pruned(resource(kind, old)) if old is not None else None)]


def operator_refusal(kind: str, spec: Any, old: Any = None) -> SpecError | None:
    try:
        operator_check(kind, {"spec": spec}, {"spec": old} if old is not None else None)
    except SpecError as exc:
        return exc
    return None


def has_null(value: Any) -> bool:
    if isinstance(value, dict):
        return any(v is None or has_null(v) for v in value.values())
    return isinstance(value, list) and any(v is None or has_null(v) for v in value)


# --- disagreements found so far: each fails its own strict xfail test below until fixed -------------


@dataclass(frozen=True)
class Gap:
    """A known disagreement: `crd` matches a refusal of the API server that the operator does not
    make, `operator` a refusal of the operator that the API server does not make; `fix` says where."""

    name: str
    fix: str
    crd: Callable[[Refusal], bool] = lambda _r: False
    operator: Callable[[SpecError], bool] = lambda _e: False


GAPS = ()


def disagreement(kind: str, spec: Any, old: Any = None) -> str | None:
    """What the judges disagree on, beyond the known gaps; None when they agree."""
    refusals = crd_refusals(kind, spec, old)
    judged = {"the stored spec": operator_refusal(kind, stored(kind, spec), None if old is None else stored(kind, old))}
    if not has_null(spec) and not has_null(old):  # the API server prunes nulls: no spec with one reaches the operator
        judged["the spec as written"] = operator_refusal(kind, copy.deepcopy(spec), copy.deepcopy(old))
    for form, error in judged.items():
        if error is None and refusals and not all(any(g.crd(r) for g in GAPS) for r in refusals):
            return f"the CRD refuses ({refusals}), the operator accepts {form}"
        if error is not None and not refusals and not any(g.operator(error) for g in GAPS):
            return f"the CRD accepts, the operator refuses {form}: {error.field}: {error.message}"
    return None


# --- specs drawn from the CRD's schema -------------------------------------------------------------


def field(schema: dict, wrong: bool) -> st.SearchStrategy:
    """A value for a field: valid, or with `wrong` about one time in INVALID_ONE_IN just outside the schema."""
    if not wrong:
        return valid(schema, wrong)
    return st.integers(0, INVALID_ONE_IN - 1).flatmap(lambda k: invalid(schema) if k == 0 else valid(schema, wrong))


def valid(schema: dict, wrong: bool, *, required: bool = True) -> st.SearchStrategy:
    """A valid value (its fields may be wrong with `wrong`); `required=False` leaves out required fields too (a patch)."""
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo, hi = schema.get("minimum", -(2**31)), schema.get("maximum", 2**31)
        return st.integers(lo, min(hi, lo + 4)) | st.integers(lo, hi) | st.just(hi)
    if kind == "string":
        return _strings(schema)
    if kind == "array":
        return st.lists(field(schema["items"], wrong), min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" and "properties" in schema:
        props, needed = schema["properties"], set(schema.get("required", ())) if required else set()
        return st.fixed_dictionaries(
            {name: field(props[name], wrong) for name in props if name in needed},
            optional={name: field(props[name], wrong) for name in props if name not in needed},
        )
    if kind == "object":  # a map, or an object the CRD keeps as given (resources, tolerations, dataVolume)
        values = field(schema["additionalProperties"], wrong) if isinstance(schema.get("additionalProperties"), dict) else st.just({})
        keys = st.sampled_from(["emptyDir", "hostPath", "limits", "zone", "gpu"])
        return st.dictionaries(keys, values, min_size=schema.get("minProperties", 0), max_size=min(schema.get("maxProperties", 3), 3))
    raise NotImplementedError(f"no strategy for {schema}")


def _strings(schema: dict) -> st.SearchStrategy:
    lo, hi = schema.get("minLength", 0), schema.get("maxLength", 64)
    pattern = schema.get("pattern")
    if pattern is None:
        text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=lo, max_size=min(hi, 12))
        return text | st.just("a" * hi)
    anchored = pattern.endswith("$")  # from_regex's "$" may match before a final newline: draw full matches only
    matching = st.from_regex(pattern, fullmatch=anchored) if anchored else st.from_regex(pattern).map(lambda s: s.replace("\n", ""))
    known = [n for n in NUMBERS if jsonschema.Draft202012Validator({"pattern": pattern}).is_valid(n)]
    return st.one_of(matching, st.sampled_from(known or ["/"])).filter(lambda s: lo <= len(s) <= hi)


def invalid(schema: dict) -> st.SearchStrategy:
    """A value just outside the schema: a wrong type, null, a bound +-1, one item or character too many."""
    kind, choices = schema.get("type"), [None, *WRONG_TYPES]
    if "enum" in schema:
        choices += ["Nope"]
    if kind == "integer":
        choices += [schema[k] + d for k, d in (("minimum", -1), ("maximum", 1)) if k in schema]
    if kind == "string":
        choices += ["a" * (schema.get("maxLength", 0) + 1)] if "maxLength" in schema else []
        choices += [""] if schema.get("minLength") else []
        choices += ["not a number", "-1", "1e400"] if "pattern" in schema else []
    if kind == "array":
        choices += [[]] if schema.get("minItems") else []
        if "maxItems" in schema and schema["maxItems"] <= 64:
            over = schema["maxItems"] + 1
            return st.sampled_from(choices) | st.lists(valid(schema["items"], False), min_size=over, max_size=over)
    if kind == "object" and schema.get("required"):
        return st.sampled_from(choices) | valid(schema, False).map(lambda d: {k: v for k, v in d.items() if k != schema["required"][0]})
    if kind == "object" and "maxProperties" in schema and "additionalProperties" in schema:
        over = schema["maxProperties"] + 1
        return st.sampled_from(choices) | st.builds(lambda v: {f"k{i}": v for i in range(over)}, valid(schema["additionalProperties"], False))
    return st.sampled_from(choices)  # some are valid after all (an empty list, an empty object): the judges decide


def edge(schema: dict) -> st.SearchStrategy:
    """A value at or just past an edge of a field: its bounds, the numeric strings, an empty or full list."""
    kind, values = schema.get("type"), list(schema.get("enum", ()))
    if kind == "integer":
        values += [schema.get("minimum", 0), schema.get("maximum", 2**31)]
    if kind == "string" and "pattern" in schema:
        values += [n for n in NUMBERS if jsonschema.Draft202012Validator({"pattern": schema["pattern"]}).is_valid(n)]
    elif kind == "string":
        values += ["", "a" * schema.get("maxLength", 64)]
    if kind == "object":
        values += [{}]
    edges = st.sampled_from(values) if values else st.nothing()
    if kind == "array":
        edges = st.lists(edge(schema["items"]), max_size=3)
    return edges | invalid(schema)


def fields(schema: dict, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """(path, schema) of every field below an object, nested objects' fields included."""
    out = []
    for name, sub in (schema.get("properties") or {}).items():
        out += [(path + (name,), sub), *fields(sub, path + (name,))]
    return out


def put(spec: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of spec with value at path (objects created on the way)."""
    out = copy.deepcopy(spec) if isinstance(spec, dict) else {}
    node = out
    for step in path[:-1]:
        node[step] = node[step] if isinstance(node.get(step), dict) else {}
        node = node[step]
    node[path[-1]] = value
    return out


def one_change(base: st.SearchStrategy, kind: str) -> st.SearchStrategy:
    """A spec from base with one field set to an edge value: the verdicts then hinge on that field."""
    return st.tuples(base, st.sampled_from(fields(spec_schema(kind)))).flatmap(lambda pick: edge(pick[1][1]).map(lambda value: put(pick[0], pick[1][0], value)))


def specs(kind: str) -> st.SearchStrategy:
    """Valid field by field (so that the CEL rules run), with a few fields wrong, or valid but for one edge."""
    schema = spec_schema(kind)
    return st.one_of(valid(schema, False), valid(schema, True), one_change(valid(schema, False), kind))


def updates(kind: str) -> st.SearchStrategy:
    """(old, new): a spec the CRD accepts, and the same with a few fields drawn again or one set to an edge."""
    old = valid(spec_schema(kind), False).filter(lambda s: crd_accepts(kind, s))
    patch = valid(spec_schema(kind), False, required=False) | valid(spec_schema(kind), True, required=False)
    return old.flatmap(lambda o: st.tuples(st.just(o), patch.map(lambda p: merge(o, p)) | one_change(st.just(o), kind)))


def crd_accepts(kind: str, spec: Any) -> bool:
    return not crd_refusals(kind, spec)


# --- agreement -------------------------------------------------------------------------------------


def assert_agree(kind: str, spec: Any, old: Any = None) -> None:
    problem = disagreement(kind, spec, old)
    assert problem is None, f"{kind} {'update' if old is not None else 'create'}: {problem}\nspec={brief(spec)!r}\nold={brief(old)!r}"


def brief(value: Any) -> Any:
    """value with long strings and lists cut, for messages."""
    if isinstance(value, dict):
        return {k: brief(v) for k, v in value.items()}
    if isinstance(value, list):
        return [brief(v) for v in value[:5]] + ([f"... {len(value)} items"] if len(value) > 5 else [])
    return f"{value[:12]}... ({len(value)} characters)" if isinstance(value, str) and len(value) > 24 else value


@pytest.mark.parametrize("kind", KINDS)
def test_crd_and_operator_agree_on_generated_specs(kind):
    given(specs(kind))(SHORT(lambda spec: assert_agree(kind, spec)))()


@pytest.mark.parametrize("kind", KINDS)
def test_crd_and_operator_agree_on_generated_updates(kind):
    given(updates(kind))(SHORT(lambda pair: assert_agree(kind, pair[1], pair[0])))()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_crd_and_operator_agree_on_many_generated_specs_and_updates(kind):
    given(specs(kind))(LONG(lambda spec: assert_agree(kind, spec)))()
    given(updates(kind))(LONG(lambda pair: assert_agree(kind, pair[1], pair[0])))()


# --- each known gap, shown on one case (strict: fixing the gap fails the test, then drop the gap) ---

GAP_CASES = {}
# Gaps found and closed (the CRD or the operator changed): both now refuse these.
CLOSED_GAPS = {
    "bounds": (api.CLUSTER_KIND, {"model": {"source": "x" * 1025}}),
    "falsy-wrong-type": (api.CLUSTER_KIND, {"model": {"source": "tiny"}, "serving": [], "tolerations": {}}),
    "cert-manager-without-issuer": (api.CLUSTER_KIND, {"model": {"source": "tiny"}, "security": {"certManager": {}}}),
    "zero-dp-numbers": (api.CLUSTER_KIND, {"model": {"source": "tiny"}, "federation": {"clipNorm": "0"}}),
    "empty-participant": (api.ROUND_KIND, {"clusterRef": {"name": "tiny"}, "participants": [""]}),
    "duplicate-edge-device": (api.CLUSTER_KIND, {"model": {"source": "tiny"}, "cloudEdge": {"edges": ["jetson-0", "jetson-0"]}}),
    "empty-issuer-name": (api.CLUSTER_KIND, {"model": {"source": "tiny"}, "security": {"certManager": {"issuerRef": {"name": ""}}}}),
}


@pytest.mark.parametrize("name", sorted(CLOSED_GAPS))
def test_closed_gaps_are_refused_by_both(name):
    kind, spec = CLOSED_GAPS[name]
    assert crd_refusals(kind, spec) and operator_refusal(kind, spec) is not None


def test_every_gap_has_a_case():
    assert sorted(GAP_CASES) == sorted(g.name for g in GAPS)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="a known disagreement between the CRD and the operator (GAPS)")
@pytest.mark.parametrize("gap", GAPS, ids=lambda g: g.name)
def test_known_gap(gap):
    kind, spec = GAP_CASES[gap.name]
    assert bool(crd_refusals(kind, spec)) == (operator_refusal(kind, spec) is not None), gap.fix
