"""The federated round state machine, driven event by event as the operator and local mode do."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collm_control.rounds import (
    STAGES,
    Aggregate,
    Aggregated,
    AggregatorFailed,
    Condition,
    Evaluate,
    Evaluated,
    EvaluationFailed,
    Finish,
    KeyAdvertised,
    Outcome,
    ParticipantFailed,
    Publish,
    PublishAcked,
    PublishFailed,
    Refused,
    Result,
    RoundSpec,
    RoundState,
    ShareKeys,
    Started,
    StartTraining,
    Tick,
    UpdateUploaded,
    laggards,
    pending_actions,
    start,
    step,
)

SPEC = RoundSpec(
    "r1",
    replicas=("a", "b", "c", "d"),
    participants=("a", "b", "c"),
    aggregator="a",
    local_steps=5,
    deadline_s=100.0,
    min_participants=2,
    eval_tolerance=0.0,
    publish_deadline_s=30.0,
)
NEW = "sha-new"


def upload(at, p, sha=None):
    return UpdateUploaded(at, p, num_samples=10, sha256=sha or f"sha-{p}", bytes=1000)


def run(events, state=None, spec=SPEC):
    """Apply events in order; returns the final state and the list of action lists."""
    state = state or start(spec)
    outputs = []
    for event in events:
        state, actions = step(state, event)
        outputs.append(actions)
    return state, outputs


TRAINING = [Started(0.0, "v1", "sha-base"), upload(10, "a"), upload(11, "b"), upload(12, "c")]
AGGREGATION = [Aggregated(20.0, NEW, ("a", "b", "c"), (), 3000)]
EVALUATION = [Evaluated(30, "a", 1.0, 1.2, 100), Evaluated(31, "b", 1.1, 1.2, 100), Evaluated(32, "c", 0.9, 1.0, 200)]
PUBLISHING = [PublishAcked(40, "a", NEW), PublishAcked(41, "b", NEW), PublishAcked(42, "d", NEW), PublishAcked(43, "c", NEW)]
HAPPY = TRAINING + AGGREGATION + EVALUATION + PUBLISHING


def only(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_happy_path_reaches_succeeded_with_conditions_in_order_and_timings():
    state, outputs = run(HAPPY)
    emitted = [a for actions in outputs for a in actions]
    assert [type(a) for a in emitted] == [StartTraining, Aggregate, Evaluate, Publish, Finish]
    assert emitted[0] == StartTraining(("a", "b", "c"), "v1", "sha-base", 5, 100.0, "a")
    assert emitted[1] == Aggregate("a", ("a", "b", "c"))
    assert emitted[2] == Evaluate(("a", "b", "c"), NEW)
    assert emitted[3] == Publish(("a", "b", "c", "d"), NEW, ("a",))
    assert emitted[4].succeeded and emitted[4].reason == "Published"
    assert state.finished and state.succeeded and state.result is Result.SUCCEEDED
    assert all(state.conditions[c].status == "True" for c in Condition)
    times = [state.conditions[c].at for c in Condition]
    assert times == sorted(times) == [12, 20, 32, 43, 43]
    assert (state.started_at, state.trained_at, state.aggregated_at, state.evaluated_at, state.published_at, state.finished_at) == (0, 12, 20, 32, 43, 43)
    assert state.freshness_s == 43 - 20
    assert state.bytes_uploaded == 3000 and state.bytes_aggregated == 3000
    assert state.eval_loss_after == pytest.approx((1.0 * 100 + 1.1 * 100 + 0.9 * 200) / 400)
    assert state.eval_loss_before == pytest.approx((1.2 * 100 + 1.2 * 100 + 1.0 * 200) / 400)
    assert all(state.participants[p].outcome is Outcome.ACCEPTED for p in SPEC.participants)
    assert laggards(state) == ()


def test_conditions_become_true_one_stage_at_a_time():
    state, seen = start(SPEC), []
    for event in HAPPY:
        state, _ = step(state, event)
        true = [c for c in STAGES if state.conditions[c].status == "True"]
        assert true == list(STAGES[: len(true)])
        seen.append(len(true))
    assert seen == sorted(seen) and seen[-1] == 4


def test_deadline_with_enough_uploads_proceeds_and_marks_the_rest_late():
    state, outputs = run([Started(0.0, "v1", "sb"), upload(10, "a"), upload(20, "b"), Tick(99.9), Tick(100.0)])
    assert outputs[3] == []
    assert outputs[4] == [Aggregate("a", ("a", "b"))]
    assert state.participants["c"].outcome is Outcome.LATE
    assert "RoundClosed" in state.participants["c"].reason
    assert state.conditions[Condition.TRAINED].status == "True"
    assert "late: ['c']" in state.conditions[Condition.TRAINED].message


def test_deadline_with_too_few_uploads_fails_not_enough_participants():
    state, outputs = run([Started(0.0, "v1", "sb"), upload(10, "a"), Tick(150.0)])
    assert outputs[-1] == [Finish(False, "NotEnoughParticipants", state.conditions[Condition.SUCCEEDED].message)]
    assert state.result is Result.FAILED
    assert state.conditions[Condition.TRAINED].status == "False"
    assert state.conditions[Condition.SUCCEEDED].reason == "NotEnoughParticipants"
    assert "1 of 3" in state.conditions[Condition.SUCCEEDED].message
    assert state.conditions[Condition.AGGREGATED].status == "Unknown"


def test_late_upload_is_refused_with_a_clear_reason():
    state, _ = run([Started(0.0, "v1", "sb"), upload(10, "a"), upload(20, "b"), Tick(100.0)])
    after, actions = step(state, upload(101, "c"))
    assert after == state
    [refusal] = actions
    assert refusal.to == "c" and refusal.reason == "RoundClosed"
    assert str(refusal).startswith("RoundClosed: the round's deadline passed at 100")


def test_upload_past_the_deadline_is_refused_and_fires_the_deadline_itself():
    state, outputs = run([Started(0.0, "v1", "sb"), upload(10, "a"), upload(20, "b"), upload(100.5, "c")])
    refusal, aggregate = outputs[-1]
    assert isinstance(refusal, Refused) and refusal.reason == "RoundClosed"
    assert aggregate == Aggregate("a", ("a", "b"))
    assert state.participants["c"].outcome is Outcome.LATE


def test_a_failed_participant_is_dropped_and_the_round_goes_on_without_waiting():
    state, outputs = run([Started(0.0, "v1", "sb"), ParticipantFailed(5, "c", "pod evicted"), upload(10, "a"), upload(11, "b")])
    assert state.participants["c"].outcome is Outcome.DROPPED
    assert state.participants["c"].reason == "pod evicted"
    assert outputs[-1] == [Aggregate("a", ("a", "b"))]
    _, actions = step(state, upload(12, "c"))
    assert actions[0].reason == "ParticipantDropped"


def test_failures_that_make_min_participants_unreachable_fail_at_once():
    state, outputs = run([Started(0.0, "v1", "sb"), ParticipantFailed(5, "b", "dead"), ParticipantFailed(6, "c", "dead")])
    assert outputs[-1][0].reason == "NotEnoughParticipants"
    assert state.finished_at == 6


@pytest.mark.parametrize(
    "prefix",
    [TRAINING[:2], TRAINING, TRAINING + AGGREGATION, TRAINING + AGGREGATION + EVALUATION[:2]],
    ids=["training", "aggregating", "evaluating", "evaluating-partly"],
)
def test_aggregator_failure_before_publishing_ends_failed_aggregator_lost(prefix):
    state, outputs = run(prefix + [AggregatorFailed(35, "node lost")])
    stage_condition = state.conditions[next(c for c in STAGES if state.conditions[c].status != "True")]
    assert stage_condition.status == "False" and stage_condition.reason == "AggregatorLost"
    assert outputs[-1][0].reason == "AggregatorLost" and not outputs[-1][0].succeeded
    assert "new round" in outputs[-1][0].message
    assert state.result is Result.FAILED and state.conditions[Condition.PUBLISHED].status == "Unknown"
    rest, later = run(HAPPY[len(prefix) :], state)
    assert rest == state and all(isinstance(a, Refused) for actions in later for a in actions)
    assert not any(isinstance(a, Publish) for actions in outputs + later for a in actions)


def test_aggregator_lost_during_publishing_after_an_ack_keeps_publishing_from_acked_replicas():
    state, _ = run(TRAINING + AGGREGATION + EVALUATION + [PublishAcked(40, "b", NEW), PublishFailed(41, "c", "io")])
    state, actions = step(state, AggregatorFailed(42, "node lost"))
    assert actions == [] and not state.finished
    state, actions = step(state, Tick(43))
    assert actions == [Publish(("a", "c"), NEW, ("b",))]
    state, _ = run([PublishAcked(44, "c", NEW), PublishAcked(45, "d", NEW), Tick(80)], state)
    assert state.succeeded and state.conditions[Condition.PUBLISHED].reason == "PartiallyPublished"
    assert laggards(state) == ("a",)


def test_aggregator_lost_during_publishing_before_any_ack_fails():
    state, _ = run(TRAINING + AGGREGATION + EVALUATION + [PublishFailed(40, r, "io") for r in "bcd"])
    state, actions = step(state, AggregatorFailed(41, "node lost"))
    assert actions[0] == Finish(False, "AggregatorLost", state.conditions[Condition.SUCCEEDED].message)
    assert state.conditions[Condition.PUBLISHED].status == "False"


def test_eval_gate_rejection_keeps_the_current_adapter_and_names_both_losses():
    worse = [Evaluated(30, "a", 2.0, 1.5, 100), Evaluated(31, "b", 2.0, 1.5, 100), Evaluated(32, "c", 2.0, 1.5, 100)]
    state, outputs = run(TRAINING + AGGREGATION + worse)
    [finish] = outputs[-1]
    assert finish == Finish(False, "EvalGateFailed", finish.message)
    assert "2.0000" in finish.message and "1.5000" in finish.message
    assert state.result is Result.REJECTED
    assert state.conditions[Condition.EVALUATED].status == "False"
    assert state.conditions[Condition.PUBLISHED].status == "Unknown"
    assert state.publishes == {} and pending_actions(state) == [finish]


def test_eval_tolerance_is_absolute_nats():
    spec = RoundSpec(**{**SPEC.__dict__, "eval_tolerance": 0.5})
    worse = [Evaluated(30, p, 2.0, 1.5, 100) for p in "abc"]
    state, outputs = run(TRAINING + AGGREGATION + worse, spec=spec)
    assert isinstance(outputs[-1][0], Publish) and state.conditions[Condition.EVALUATED].reason == "GatePassed"


def test_federated_eval_loss_is_weighted_by_tokens_and_ignores_failed_evaluators():
    events = [Evaluated(30, "a", 1.0, 2.0, 100), Evaluated(31, "b", 3.0, 2.5, 300), EvaluationFailed(32, "c", "OOM")]
    state, _ = run(TRAINING + AGGREGATION + events)
    assert state.eval_loss_after == pytest.approx((1.0 * 100 + 3.0 * 300) / 400)  # 2.5
    assert state.eval_loss_before == pytest.approx((2.0 * 100 + 2.5 * 300) / 400)  # 2.375
    assert state.eval_tokens == 400 and state.result is Result.REJECTED  # an unweighted mean would pass
    assert "OOM" in state.conditions[Condition.EVALUATED].message


def test_no_evaluation_at_all_fails_the_round():
    state, _ = run(TRAINING + AGGREGATION + [EvaluationFailed(30, p, "down") for p in "abc"])
    assert state.result is Result.FAILED and state.conditions[Condition.EVALUATED].reason == "NoEvaluation"


def test_only_accepted_participants_evaluate():
    state, outputs = run(TRAINING + [Aggregated(20.0, NEW, ("a", "b"), (("c", "NormOutlier"),), 3000)])
    assert outputs[-1] == [Evaluate(("a", "b"), NEW)]
    assert state.participants["c"].outcome is Outcome.REJECTED and state.participants["c"].reason == "NormOutlier"
    _, actions = step(state, Evaluated(30, "c", 0.1, 9.0, 1000))
    assert actions[0].reason == "NotAnEvaluator"


def test_publish_failure_is_retried_on_the_next_tick_for_the_missing_replica_only():
    state, _ = run(TRAINING + AGGREGATION + EVALUATION + [PublishAcked(40, "a", NEW), PublishAcked(41, "c", NEW)])
    state, actions = step(state, PublishFailed(42, "b", "fetch timed out"))
    assert actions == []
    state, actions = step(state, Tick(43))
    assert actions == [Publish(("b",), NEW, ("a",))]
    assert state.publishes["b"].attempts == 2
    again, actions = step(state, Tick(44))
    assert actions == [] and again == state  # b is in flight again: nothing to retry
    state, outputs = run([PublishAcked(45, "d", NEW), PublishAcked(46, "b", NEW)], state)
    assert outputs[-1][0] == Finish(True, "Published", state.conditions[Condition.SUCCEEDED].message)
    assert state.freshness_s == 46 - 20


def test_publish_deadline_with_laggards_still_succeeds_and_lists_them():
    state, outputs = run(TRAINING + AGGREGATION + EVALUATION + [PublishAcked(40, r, NEW) for r in "abc"] + [PublishFailed(41, "d", "disk full"), Tick(62)])
    assert outputs[-1][0] == Finish(True, "PartiallyPublished", state.conditions[Condition.PUBLISHED].message)
    assert "['d']" in state.conditions[Condition.PUBLISHED].message and laggards(state) == ("d",)
    assert state.freshness_s == 40 - 20


def test_publish_deadline_without_any_ack_fails():
    state, _ = run(TRAINING + AGGREGATION + EVALUATION + [PublishFailed(40, r, "io") for r in "abcd"] + [Tick(70)])
    assert state.result is Result.FAILED and state.conditions[Condition.PUBLISHED].reason == "NotPublished"


def test_an_ack_for_another_version_is_refused():
    state, _ = run(TRAINING + AGGREGATION + EVALUATION)
    after, actions = step(state, PublishAcked(40, "a", "sha-old"))
    assert after == state and actions[0].reason == "WrongVersion"


@pytest.mark.parametrize(
    "event, reason",
    [
        (upload(5, "d"), "NotAParticipant"),
        (upload(5, "a", sha="sha-other"), "Duplicate"),
        (Aggregated(5, NEW, ("a",), (), 1), "NotAggregating"),
        (Evaluated(5, "a", 1.0, 1.0, 10), "NotEvaluating"),
        (PublishAcked(5, "a", NEW), "NotPublishing"),
        (Started(5, "v2", "sb2"), "AlreadyStarted"),
        (KeyAdvertised(5, "a", "ka"), "NotSecure"),
    ],
)
def test_unexpected_events_are_refused_without_changing_the_state(event, reason):
    state, _ = run(TRAINING[:2])
    after, actions = step(state, event)
    assert after == state and [a.reason for a in actions] == [reason]


def test_events_before_started_are_refused():
    state = start(SPEC)
    after, actions = step(state, upload(1, "a"))
    assert after == state and actions[0].reason == "NotStarted"
    assert step(state, Tick(1000)) == (state, []) and pending_actions(state) == []


def test_every_event_applied_twice_changes_nothing_the_second_time():
    state = start(SPEC)
    for event in HAPPY:
        state, _ = step(state, event)
        again, actions = step(state, event)
        assert again == state and all(isinstance(a, Refused) for a in actions)


EXPECTED_PENDING = [  # after len(HAPPY[:n]) events
    (1, [StartTraining(("a", "b", "c"), "v1", "sha-base", 5, 100.0, "a")]),
    (3, [StartTraining(("c",), "v1", "sha-base", 5, 100.0, "a")]),
    (4, [Aggregate("a", ("a", "b", "c"))]),
    (5, [Evaluate(("a", "b", "c"), NEW)]),
    (7, [Evaluate(("c",), NEW)]),
    (8, [Publish(("a", "b", "c", "d"), NEW, ("a",))]),
    (10, [Publish(("c", "d"), NEW, ("a",))]),
]


@pytest.mark.parametrize("n, expected", EXPECTED_PENDING)
def test_a_restarted_driver_resumes_the_stage_in_progress_only(n, expected):
    state, _ = run(HAPPY[:n])
    restored = RoundState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    assert pending_actions(restored) == expected
    finished, _ = run(HAPPY[n:], restored)
    assert finished.succeeded and finished == run(HAPPY)[0]


def test_a_finished_round_only_reminds_the_driver_to_finish():
    state, outputs = run(HAPPY)
    restored = RoundState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state and pending_actions(restored) == [outputs[-1][0]]


def test_to_dict_is_json_ready_with_camel_case_keys():
    data = run(HAPPY[:8])[0].to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["conditions"]["Evaluated"]["status"] == "True"
    assert data["participants"]["a"]["outcome"] == "Accepted"
    assert data["publishes"]["d"] == {"status": "InFlight", "attempts": 1, "reason": "", "ackedAt": None}
    assert data["spec"]["minParticipants"] == 2 and data["evalLossAfter"] == pytest.approx(0.975)


@pytest.mark.parametrize(
    "change, fix",
    [
        ({"aggregator": "z"}, "aggregator 'z' must be one of the replicas"),
        ({"participants": ("a", "z")}, "participants ['z'] are not replicas"),
        ({"min_participants": 4}, "min_participants must be between 1 and the 3 participants"),
        ({"min_participants": 0}, "min_participants must be between 1"),
        ({"local_steps": 0}, "local_steps must be a positive integer"),
        ({"deadline_s": -1}, "deadline_s must be a positive number"),
        ({"publish_deadline_s": 0}, "publish_deadline_s must be a positive number"),
        ({"eval_tolerance": -0.1}, "eval_tolerance must be a non-negative number"),
        ({"replicas": ("a", "a", "b", "c")}, "replicas must name at least one replica, each once"),
    ],
)
def test_invalid_specs_say_what_to_fix(change, fix):
    with pytest.raises(ValueError, match="invalid spec for round 'r1'") as error:
        RoundSpec(**{**SPEC.__dict__, **change})
    assert fix in str(error.value)


# Random event sequences: most events answer what the round asks for (so rounds get deep), one in
# five is arbitrary (duplicates, strangers, wrong stage, wrong version, odd numbers).
NAMES = st.sampled_from(("a", "b", "c", "d", "x"))
LOSS = st.one_of(st.floats(0, 5), st.just(float("nan")), st.just(-1.0))


ARBITRARY_EVENT = st.one_of(  # stamped at 0; the test moves each to its time
    st.builds(Started, st.just(0.0), st.sampled_from(("v1", "v2")), st.just("sb")),
    st.builds(UpdateUploaded, st.just(0.0), NAMES, st.integers(-1, 50), st.sampled_from(("s1", "s2", "")), st.integers(0, 10_000)),
    st.builds(ParticipantFailed, st.just(0.0), NAMES, st.text(max_size=3)),
    st.builds(Tick, st.just(0.0)),
    st.builds(
        Aggregated,
        st.just(0.0),
        st.sampled_from((NEW, "")),
        st.lists(NAMES, max_size=3).map(tuple),
        st.lists(st.tuples(NAMES, st.just("Why")), max_size=2).map(tuple),
        st.integers(0, 10),
    ),
    st.builds(AggregatorFailed, st.just(0.0), st.just("gone")),
    st.builds(Evaluated, st.just(0.0), NAMES, LOSS, LOSS, st.integers(-1, 500)),
    st.builds(EvaluationFailed, st.just(0.0), NAMES, st.just("oom")),
    st.builds(PublishAcked, st.just(0.0), NAMES, st.sampled_from((NEW, "sha-old"))),
    st.builds(PublishFailed, st.just(0.0), NAMES, st.just("io")),
    st.builds(KeyAdvertised, st.just(0.0), NAMES, st.sampled_from(("k1", "k2", ""))),
)


def answer(data, state, at):
    """An event that answers one of the round's pending actions (a plausible next event)."""
    actions = [a for a in pending_actions(state) if not isinstance(a, Finish)]
    if state.started_at is None or not actions:
        return Started(at, "v1", "sb") if state.started_at is None else Tick(at)
    action = actions[0]
    if isinstance(action, StartTraining):
        p = data.draw(st.sampled_from(action.participants))
        if state.spec.secure and not state.participants[p].public_key:
            return data.draw(st.sampled_from((KeyAdvertised(at, p, f"key-{p}"),) * 4 + (ParticipantFailed(at, p, "dead"),)))
        return data.draw(st.sampled_from((upload(at, p),) * 4 + (ParticipantFailed(at, p, "dead"),)))
    if isinstance(action, Aggregate):
        accepted = data.draw(st.lists(st.sampled_from(action.participants), unique=True))
        rejected = tuple((p, "Outlier") for p in action.participants if p not in accepted)
        lost = data.draw(st.integers(0, 5)) == 0
        return AggregatorFailed(at, "x") if lost else Aggregated(at, NEW, tuple(accepted), rejected, 9)
    if isinstance(action, Evaluate):
        p = data.draw(st.sampled_from(action.participants))
        good = Evaluated(at, p, data.draw(st.floats(0, 3)), data.draw(st.floats(0, 3)), data.draw(st.integers(1, 99)))
        return data.draw(st.sampled_from((good,) * 4 + (EvaluationFailed(at, p, "oom"),)))
    r = data.draw(st.sampled_from(action.replicas))
    return data.draw(st.sampled_from((PublishAcked(at, r, NEW),) * 3 + (PublishFailed(at, r, "io"), Tick(at))))


@settings(max_examples=300, deadline=None)
@given(st.data(), st.floats(0, 0.5), st.booleans())
def test_random_event_sequences_keep_the_invariants(data, tolerance, secure):
    spec = RoundSpec(**{**SPEC.__dict__, "eval_tolerance": tolerance, "secure": secure})
    state, at, finishes, ever_published = start(spec), 0.0, 0, False
    for _ in range(data.draw(st.integers(1, 40))):
        at += data.draw(st.sampled_from((0.0, 1.0, 2.0, 5.0, 40.0)))
        arbitrary = data.draw(st.integers(0, 4)) == 0
        event = replace(data.draw(ARBITRARY_EVENT), at=at) if arbitrary else answer(data, state, at)
        new, actions = step(state, event)
        if state.finished:
            assert new == state and all(isinstance(a, Refused) for a in actions)
        again, repeated = step(new, event)
        assert again == new and all(isinstance(a, Refused) for a in repeated)
        assert RoundState.from_dict(json.loads(json.dumps(new.to_dict()))) == new
        true = [c for c in STAGES if new.conditions[c].status == "True"]
        assert true == list(STAGES[: len(true)])
        if any(isinstance(a, Publish) for a in actions + pending_actions(new)):
            assert new.conditions[Condition.EVALUATED].status == "True" and not new.finished
            assert new.eval_loss_after <= new.eval_loss_before + tolerance
            ever_published = True
        if new.succeeded:
            assert ever_published and any(p.acked_at is not None for p in new.publishes.values())
            assert new.conditions[Condition.PUBLISHED].status == "True"
        stage = new.stage
        for pending in pending_actions(new):
            assert not isinstance(pending, StartTraining) or stage is Condition.TRAINED
            assert not isinstance(pending, Aggregate) or stage is Condition.AGGREGATED
            assert not isinstance(pending, Evaluate) or stage is Condition.EVALUATED
            assert not isinstance(pending, Publish) or stage is Condition.PUBLISHED
            assert not isinstance(pending, ShareKeys) or (stage is Condition.TRAINED and secure)
        if state.keys_shared_at is not None:  # the map never changes once it went out
            assert (new.key_holders, new.public_keys()) == (state.key_holders, state.public_keys())
        for p, record in new.participants.items():  # a secure round's uploads come from key holders, after the keys
            assert not (secure and record.uploaded_at is not None) or (p in new.key_holders and record.uploaded_at >= new.keys_shared_at)
        finishes += len(only(actions, Finish))
        assert finishes == (1 if new.finished else 0)
        state = new


SECURE = RoundSpec(**{**SPEC.__dict__, "aggregator": "d", "secure": True})
KEYS = (("a", "ka"), ("b", "kb"), ("c", "kc"))
KEYED = [Started(0.0, "v1", "sha-base"), *(KeyAdvertised(1.0, p, key) for p, key in KEYS)]


def test_a_secure_round_shares_the_keys_once_every_participant_advertised_one_and_takes_uploads_only_then():
    state, outputs = run(KEYED, spec=SECURE)
    assert [only(o, ShareKeys) for o in outputs] == [[], [], [], [ShareKeys(("a", "b", "c"), KEYS)]]
    assert state.key_holders == ("a", "b", "c") and state.keys_shared_at == 1.0 and state.public_keys() == KEYS
    early, _ = run(KEYED[:3], spec=SECURE)
    after, actions = step(early, upload(2, "a"))
    assert after == early and [a.reason for a in actions] == ["KeysNotShared"]
    finished, _ = run(TRAINING[1:] + AGGREGATION + EVALUATION + PUBLISHING, state)
    assert finished.succeeded


def test_a_participant_that_fails_before_its_key_is_left_out_of_the_map():
    state, outputs = run([KEYED[0], KEYED[1], ParticipantFailed(1, "c", "gone"), KEYED[2]], spec=SECURE)
    assert outputs[-1] == [ShareKeys(("a", "b"), KEYS[:2])] and state.key_holders == ("a", "b")
    alone, outputs = run([KEYED[0], KEYED[1], ParticipantFailed(1, "b", "gone"), ParticipantFailed(1, "c", "gone")], spec=replace(SECURE, min_participants=1))
    assert alone.result is Result.FAILED and "needs >= 2 participants holding keys" in alone.conditions[Condition.SUCCEEDED].message
    assert not any(only(o, ShareKeys) for o in outputs)  # masking with no peer would send the update in the clear


def test_a_new_key_replaces_one_not_shared_yet_and_drops_its_participant_once_shared():
    state, _ = run([*KEYED[:2], KeyAdvertised(2, "a", "ka2")], spec=SECURE)
    assert state.participants["a"].public_key == "ka2" and state.participants["a"].outcome is Outcome.PENDING
    state, outputs = run([*KEYED, KeyAdvertised(5, "c", "kc2")], spec=SECURE)
    assert state.participants["c"].outcome is Outcome.DROPPED and state.participants["c"].reason.startswith("KeysLost")
    assert state.public_keys() == KEYS and not state.finished and outputs[-1] == []  # the others go on; their masks with c come off by reveal


def test_a_restarted_driver_resends_start_and_the_same_keys_and_a_round_whose_participants_lost_theirs_fails():
    state, _ = run([*KEYED, upload(3, "a")], spec=SECURE)
    restored = RoundState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state and restored.spec.secure
    assert pending_actions(restored) == [StartTraining(("b", "c"), "v1", "sha-base", 5, 100.0, "d"), ShareKeys(("b", "c"), KEYS)]
    lost, outputs = run([KeyAdvertised(6, "b", "kb2"), KeyAdvertised(6, "c", "kc2")], restored)  # both restarted: new keys
    assert lost.result is Result.FAILED and lost.conditions[Condition.SUCCEEDED].reason == "NotEnoughParticipants"
    assert only(outputs[-1], Finish) and lost.participants["b"].reason.startswith("KeysLost")
    unshared, _ = run(KEYED[:3], spec=SECURE)  # keys not shared yet: StartRound again, nothing to share
    assert pending_actions(unshared) == [StartTraining(("a", "b", "c"), "v1", "sha-base", 5, 100.0, "d")]
