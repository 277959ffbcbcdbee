"""A replica's side of federated rounds: snapshot what was learnt, upload, evaluate, publish.

The replica trains continuously (trainer.py); a round does not start training, it takes a snapshot
of the shadow once at least `local_steps` steps are in it that no global adapter holds, and uploads
`snapshot - global` (only the update leaves the replica, never its data). A replica whose plan
allows no training (cap 0) uploads what it learnt before, or fails the round at once when that is
nothing. Every call is idempotent for a round id (a retried StartRound uploads the same snapshot; a
repeated Publish of the global it already rests on changes nothing). Publishing fetches the adapter,
verifies its sha256 and shapes, serves it at once and rebases the shadow on it; requests in flight
keep their pins.

In a secure round a participant generates an ephemeral X25519 key pair at StartRound (memory only;
the public key goes back in the reply), derives its pair seeds once the operator hands it every
participant's public key (SharePublicKeys; the private key is dropped then), and masks only after
that. It announces its upload to every other participant (AnnounceUpload) and sends its masked
update only once all of them acknowledged; it never reveals the seeds of a peer that announced to it
(see secure.py: an aggregator must not be able to name an update it holds "dropped" and unmask it alone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from collm_rpc import tls
from collm_rpc.client import AgentClient

from ..engine.adapter_store import AdapterVersion, adapter_sha256
from ..engine.lora import check_adapter
from .aggregator import ROUNDS_KEPT, drop_oldest
from .secure import announcement_refusal, encode_masked, key_map_refusal, mask_update, new_key_pair, pair_seeds, reveal_refusal, reveal_seeds
from .update import UpdateError, encode_update, fetch_adapter, make_update

log = logging.getLogger(__name__)

FETCHED_KEPT = 4  # adapters fetched from peers and kept by content hash
ANNOUNCE_TIMEOUT_S = 5.0  # one AnnounceUpload call
ANNOUNCE_PATIENCE_S = 10.0  # how long a peer that has no StartRound yet (NOT_FOUND) or is unreachable is asked again
KEYS_PATIENCE_S = 60.0  # how long a secure round without a deadline waits for its peers' public keys


@dataclass(frozen=True)
class SecureRound:
    """A secure-aggregation round: who masks with whom, and the participant's own clip norm."""

    participants: tuple[str, ...]  # as started; narrowed to the key holders once their public keys arrive
    clip_norm: float | None = None
    addresses: Mapping[str, str] = field(default_factory=dict)  # participant -> host:port, to announce the upload to


@dataclass
class ParticipantRound:
    round_id: str
    state: str = "Training"  # Training -> Uploading -> Uploaded | Failed
    message: str = ""
    steps_done: int = 0
    started_at: float = 0.0
    secure: SecureRound | None = None
    # Secure rounds: the ephemeral key pair (the private key only until the peers' keys arrive; never
    # written or logged), the public keys taken, and the pair seeds, kept to reveal those of dropped peers.
    private_key: X25519PrivateKey | None = field(default=None, repr=False)
    public_key: bytes = b""
    public_keys: dict[str, bytes] | None = None
    seeds: dict | None = field(default=None, repr=False)
    keys_taken: threading.Event = field(default_factory=threading.Event, repr=False)  # set once keys are taken or refused
    deadline_unix: float = 0.0
    announced: set[str] = field(default_factory=set)  # peers that announced their upload: their seeds are never revealed
    revealed: set[str] = field(default_factory=set)  # peers whose seeds were revealed: their announcements are refused


class RoundNotStarted(KeyError):
    """An announcement for a round this replica has no StartRound for yet (the announcer asks again)."""


class Refused(ValueError):
    """A reveal or an announcement that would let the aggregator unmask one update alone."""


class Participant:
    def __init__(self, agent, aggregator) -> None:
        self.agent = agent
        self.aggregator = aggregator  # this replica's Aggregator: candidates it holds can be served locally
        self._rounds: dict[str, ParticipantRound] = {}
        self._fetched: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.local_address = ""  # set by the gRPC server once it listens, so self-uploads skip the network
        self.credentials: tls.Credentials | None = None  # this replica's mTLS credentials for calls to peers (set by the gRPC server)

    # -- adapters by content hash -------------------------------------------------------------
    def adapter(self, sha256: str) -> dict[str, torch.Tensor] | None:
        """An adapter this replica holds: a retained version, a candidate it aggregated or fetched."""
        version = self.agent.store.find(sha256)
        if version is not None:
            return dict(version.tensors)
        candidate = self.aggregator.candidate(sha256)
        if candidate is not None:
            return candidate
        with self._lock:
            return self._fetched.get(sha256)

    def obtain(self, sha256: str, source: str) -> dict[str, torch.Tensor]:
        tensors = self.adapter(sha256)
        if tensors is not None:
            return tensors
        if not source:
            raise UpdateError(f"adapter {sha256[:12]} is not held here and no source was given")
        with AgentClient(source, credentials=self.credentials) as peer:
            tensors = fetch_adapter(peer, sha256)
        check_adapter(tensors, self.agent.spec, self.agent.runtime.dims)
        with self._lock:
            self._fetched[sha256] = tensors
            drop_oldest(self._fetched, FETCHED_KEPT)  # adapters fetched for evaluation or publishing: the recent ones
        return tensors

    # -- training ----------------------------------------------------------------------------
    def start_round(
        self,
        round_id: str,
        *,
        local_steps: int,
        base_sha256: str,
        base_source: str,
        aggregator_address: str,
        deadline_unix: float = 0.0,
        only_b: bool = False,
        secure: SecureRound | None = None,
    ) -> ParticipantRound:
        with self._lock:
            existing = self._rounds.get(round_id)
            if existing is not None:
                return existing
            rnd = self._rounds[round_id] = ParticipantRound(round_id, started_at=time.time(), secure=secure, deadline_unix=deadline_unix)
            drop_oldest(self._rounds, ROUNDS_KEPT)
        trainer = self.agent.trainer
        if trainer is None:
            rnd.state, rnd.message = "Failed", "this replica has no training data (start it with --data)"
            return rnd
        rests_on = trainer.global_version
        if rests_on.sha256 != base_sha256:
            rnd.state, rnd.message = (
                "Failed",
                (
                    f"BaseMismatch: this replica rests on global version {rests_on.cluster_version} ({rests_on.sha256[:12]}), "
                    f"the round starts from {base_sha256[:12]}; publish that version to it first"
                ),
            )
            return rnd
        if only_b and not trainer.settings.freeze_a:
            rnd.state, rnd.message = "Failed", "FFA-LoRA rounds need lora_A frozen: start the agent with --train-only-b"
            return rnd
        if secure is not None:
            unaddressed = [p for p in secure.participants if p != self.agent.config.replica_id and p not in secure.addresses]
            if unaddressed:
                rnd.state, rnd.message = "Failed", f"secure rounds need every participant's address to announce the upload to; none for {unaddressed}"
                return rnd
        if trainer.unuploaded_steps == 0 and self.agent.mixer.settings.cap_tokens_per_iteration == 0:
            rnd.state, rnd.message = "Failed", "NoProgress: the plan allows no training (cap 0) and nothing was learnt since the global adapter"
            return rnd
        if secure is not None:  # this round's own key pair: its public key goes back in the StartRound reply
            rnd.private_key, rnd.public_key = new_key_pair()
        threading.Thread(
            target=self._snapshot_and_upload, args=(rnd, local_steps, deadline_unix, aggregator_address, only_b), name=f"collm-round-{round_id}", daemon=True
        ).start()
        return rnd

    def _snapshot_and_upload(self, rnd: ParticipantRound, local_steps: int, deadline_unix: float, aggregator_address: str, only_b: bool) -> None:
        """Wait for `local_steps` of progress (training goes on meanwhile), then snapshot and upload.
        Close to the deadline, upload what there is; with nothing learnt, fail."""
        trainer = self.agent.trainer
        start = time.time()
        upload_by = deadline_unix - max(1.0, 0.2 * (deadline_unix - start)) if deadline_unix else float("inf")
        while trainer.unuploaded_steps < local_steps and time.time() < upload_by:
            if self.agent.mixer.settings.cap_tokens_per_iteration == 0:
                break  # no more progress will come: upload what there is
            time.sleep(0.05)
        if rnd.secure is not None and not self._await_keys(rnd, upload_by if deadline_unix else start + KEYS_PATIENCE_S):
            return
        rnd.steps_done = trainer.unuploaded_steps
        if rnd.steps_done == 0:
            rnd.state, rnd.message = "Failed", "NoProgress: nothing was learnt since the global adapter before the deadline"
            return
        snapshot = trainer.round_snapshot(rnd.round_id)
        rnd.steps_done, rnd.state = snapshot.steps, "Uploading"
        self._upload(rnd, snapshot, aggregator_address, only_b)

    def _await_keys(self, rnd: ParticipantRound, until: float) -> bool:
        """True once the peers' public keys were taken; else the round is Failed (refused, or none came)."""
        rnd.keys_taken.wait(max(0.0, until - time.time()))
        with self._lock:  # decided under the lock take_public_keys holds: keys that come later are refused
            if rnd.seeds is not None:
                return True
            if rnd.state != "Failed":
                rnd.state, rnd.message = "Failed", "NoKeys: the other participants' public keys did not arrive in time; nothing was masked or sent"
                log.warning("round %s: %s", rnd.round_id, rnd.message)
            rnd.private_key = None
        return False

    def _upload(self, rnd: ParticipantRound, snapshot, aggregator_address: str, only_b: bool) -> None:
        agent = self.agent
        try:
            # FedAvg's weight: the training samples behind the update (steps x micro-batch).
            samples = max(1, snapshot.steps * agent.trainer.settings.micro_batch)
            update = make_update(agent.config.replica_id, rnd.round_id, snapshot.shadow, snapshot.base, samples, only_b=only_b)
            blob, sha, masked = encode_update(update), update.sha256, rnd.secure is not None
            if rnd.secure is not None:  # only the masked form leaves this replica, and only once every peer knows
                secured = mask_update(update, rnd.secure.participants, rnd.seeds, clip_norm=rnd.secure.clip_norm)
                blob, sha = encode_masked(secured), adapter_sha256(secured.masked)
                failed = self._announce(rnd)
                if failed:
                    rnd.state, rnd.message = "Failed", f"NotAnnounced: {failed}; the masked update was not sent, so this participant counts as dropped"
                    log.warning("round %s: %s", rnd.round_id, rnd.message)
                    return
            if aggregator_address == self.local_address:
                outcome = self.aggregator.receive(rnd.round_id, update.participant, blob, sha, masked=masked)
                accepted, reason, message = outcome.accepted, outcome.reason, outcome.message
            else:
                with AgentClient(aggregator_address, credentials=self.credentials) as peer:
                    reply = peer.upload(rnd.round_id, update.participant, blob, sha, masked=masked)
                accepted, reason, message = reply.accepted, reply.reason, reply.message
            rnd.state = "Uploaded" if accepted else "Failed"
            rnd.message = message if accepted else f"{reason}: {message}"
        except Exception as exc:  # the aggregator is gone or refused: the round goes on without us
            rnd.state, rnd.message = "Failed", f"upload to {aggregator_address} failed: {exc}"
            log.warning("round %s: %s", rnd.round_id, rnd.message)

    def _announce(self, rnd: ParticipantRound) -> str:
        """Announce this upload to every other participant; '' once all acknowledged, else why not.
        On failure the announcement is withdrawn where it landed: nothing will be sent, so the peers
        may reveal this participant's seeds and the round goes on without it."""
        me, secure = self.agent.config.replica_id, rnd.secure
        assert secure is not None
        give_up = time.time() + ANNOUNCE_PATIENCE_S
        if rnd.deadline_unix:
            give_up = min(give_up, rnd.deadline_unix)

        def announce(client: AgentClient, peer: str) -> str:
            while True:
                try:
                    acked_by = client.announce_upload(rnd.round_id, me).replica
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) and time.time() < give_up:
                        time.sleep(0.1)  # the peer has no StartRound yet, or is restarting
                        continue
                    return f"{peer}: {exc.code().name}: {exc.details()}"
                return "" if acked_by == peer else f"{peer}: its address {client.address} answered as {acked_by!r}"

        def withdraw(client: AgentClient, peer: str) -> str:
            client.announce_upload(rnd.round_id, me, withdraw=True)
            return ""

        failures = [f for f in self._to_peers(secure, announce).values() if f]
        if failures:
            self._to_peers(secure, withdraw)  # best effort: a peer it misses refuses to reveal, which fails the round safely
        return "; ".join(failures)

    def _to_peers(self, secure: SecureRound, call: Callable[[AgentClient, str], str]) -> dict[str, str]:
        """`call` on every other participant at once; a failure is returned as its text."""
        me = self.agent.config.replica_id
        peers = [p for p in secure.participants if p != me]

        def one(peer: str) -> str:
            address = secure.addresses.get(peer)
            if not address:
                return f"{peer}: no address given for it"
            try:
                with AgentClient(address, timeout=ANNOUNCE_TIMEOUT_S, credentials=self.credentials) as client:
                    return call(client, peer)
            except grpc.RpcError as exc:
                return f"{peer}: {exc.code().name}: {exc.details()}"

        with ThreadPoolExecutor(max_workers=max(1, len(peers))) as pool:
            return dict(zip(peers, pool.map(one, peers)))

    def take_public_keys(self, round_id: str, public_keys: Mapping[str, bytes]) -> ParticipantRound:
        """Take every key holder's public key for secure round `round_id` (relayed by the operator) and
        derive the pair seeds; the private key is dropped then. Taking the same map again changes
        nothing. Refused (and the round Failed) when the map lacks this participant's own public key
        unchanged: its peers would mask with keys it cannot match, or someone swapped keys. Refused,
        the round left as it is, for a map other than the one already taken."""
        me = self.agent.config.replica_id
        with self._lock:
            rnd = self._rounds.get(round_id)
            if rnd is None:
                raise RoundNotStarted(f"{me} has not started round {round_id}")
            if rnd.secure is None or not rnd.public_key:
                raise Refused(f"round {round_id} is not a secure round on {me}" + (f" ({rnd.message})" if rnd.state == "Failed" else ""))
            if rnd.public_keys is not None:
                if rnd.public_keys == dict(public_keys):
                    return rnd
                raise Refused(f"{me} already took other public keys for round {round_id}: it masks with those")
            if rnd.state == "Failed":
                raise Refused(f"{me} failed round {round_id}: {rnd.message}")
            reason = key_map_refusal(me, rnd.public_key, rnd.secure.participants, public_keys)
            if reason is None:
                try:
                    rnd.seeds = pair_seeds(me, rnd.private_key, public_keys, round_id)
                except ValueError as exc:  # a low-order point: no shared secret
                    reason = f"cannot agree on a pair seed with the public keys given: {exc}"
            rnd.private_key = None  # taken or refused, this round's private key has done its work
            if reason is not None:
                rnd.state, rnd.message = "Failed", f"KeysRefused: {reason}"
                rnd.keys_taken.set()
                raise Refused(reason)
            rnd.public_keys = dict(public_keys)
            rnd.secure = replace(rnd.secure, participants=tuple(p for p in rnd.secure.participants if p in public_keys))
            rnd.keys_taken.set()
            return rnd

    def take_announcement(self, round_id: str, announcer: str, *, withdraw: bool = False) -> None:
        """Record that `announcer` sends its masked update of `round_id` now (or, withdrawn, that it
        does not after all). RoundNotStarted: no StartRound here yet, the announcer asks again;
        Refused: this replica already revealed the announcer's seeds, it must not upload."""
        me = self.agent.config.replica_id
        with self._lock:
            rnd = self._rounds.get(round_id)
            if withdraw:
                if rnd is not None:
                    rnd.announced.discard(announcer)
                return
            if rnd is None:
                raise RoundNotStarted(f"{me} has not started round {round_id} yet")
            if rnd.secure is None:
                raise Refused(f"round {round_id} is not a secure round on {me}")
            reason = announcement_refusal(me, announcer, rnd.secure.participants, rnd.revealed)
            if reason is not None:
                raise Refused(reason)
            rnd.announced.add(announcer)

    def reveal(self, round_id: str, dropped: list[str]) -> dict[tuple[str, str], bytes]:
        """The pair seeds this participant shared with `dropped` peers of a secure round, no others;
        Refused for a peer that announced its upload. Decided under the lock that announcements take,
        so a reveal and an acknowledged announcement for one peer never both happen."""
        me = self.agent.config.replica_id
        with self._lock:
            rnd = self._rounds.get(round_id)
            if rnd is None or rnd.seeds is None:
                raise KeyError(f"{me} holds no pair seeds for round {round_id}")
            reason = reveal_refusal(me, dropped, rnd.announced)
            if reason is not None:
                raise Refused(reason)
            shares = reveal_seeds(me, dropped, rnd.seeds)
            rnd.revealed.update(dropped)
        return shares

    def status(self, round_id: str) -> ParticipantRound | None:
        with self._lock:
            return self._rounds.get(round_id)

    # -- evaluation and publishing ------------------------------------------------------------
    def evaluate(self, candidate_sha256: str, source: str) -> tuple[float, float, int]:
        """(candidate loss, loss of the global this replica rests on, eval tokens) on its held-out split.
        The gate compares global with global: the replica's local revisions are its own business."""
        trainer = self.agent.trainer
        if trainer is None:
            raise RuntimeError("this replica has no held-out data to evaluate on (start it with --data)")
        candidate = self.obtain(candidate_sha256, source)
        candidate_loss = trainer.evaluate(candidate)
        current_loss = trainer.local_loss(trainer.global_version)
        return candidate_loss, current_loss, trainer.eval_tokens

    def publish(
        self, sha256: str, source: str, *, cluster_version: int, eval_loss: float | None, round_id: str = "", included: tuple[str, ...] = ()
    ) -> AdapterVersion:
        """Serve global adapter `sha256` as cluster version `cluster_version` and rebase the shadow on it."""
        rests_on = self.agent.store.global_version
        if rests_on is not None and rests_on.sha256 == sha256:
            return rests_on  # already the global here: a retry changes nothing
        tensors = self.obtain(sha256, source)
        version = self.agent.adopt_global(tensors, cluster_version, round_id=round_id, included=self.agent.config.replica_id in included, eval_loss=eval_loss)
        with self._lock:
            self._fetched.pop(sha256, None)
        return version

    def rollback(self, sha256: str) -> AdapterVersion:
        version = self.agent.store.find(sha256)
        if version is None:
            raise KeyError(f"adapter {sha256[:12]} is not retained on {self.agent.config.replica_id}; retained versions: {self.agent.store.retained()}")
        return self.agent.rollback(version.number)
