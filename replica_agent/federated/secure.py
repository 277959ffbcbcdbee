"""Secure aggregation: pairwise additive masks, so the aggregator only ever learns the sum.

Each participant i turns its update into fixed point over Z_2^64 (num_samples x delta, in float64,
times 2**24, rounded; arithmetic wraps) and adds, per tensor key, sum_{j>i} PRG(s_ij) - sum_{j<i}
PRG(s_ij) (names ordered as strings). Each mask appears once with + and once with -, so the masks
cancel in the modular sum; the aggregator dequantizes and divides by sum(num_samples), which is
public. One masked update alone looks uniformly random.

Choices, and what they mean for a deployment:
- PRG: SHAKE-256 (standard library) keyed by the pair seed and the tensor key. Not numpy's PCG64:
  a quantized update is small, so a masked value shows the mask's high bits, and a
  non-cryptographic generator can be predicted from such output.
- Pair seeds: per-round ephemeral X25519 key agreement, as in Bonawitz et al. 2017. At StartRound
  each participant generates a key pair for that round (memory only, dropped with the round state)
  and returns the public key; the operator's round driver collects them and hands every participant
  the full map (SharePublicKeys, operator-only over mutual TLS). s_ij = HKDF-SHA256(X25519(sk_i,
  pk_j), info = "collm-secagg" + [round_id, sorted pair]): both ends derive it, and nobody else can,
  since it needs one of the two private keys; the aggregator and the operator see public keys only.
  A participant masks only with the map in hand, and refuses a map that lacks its own public key
  unchanged (`key_map_refusal`). The operator relays the keys unauthenticated beyond its mTLS
  channel: an operator that swapped them could unmask (Bonawitz et al. sign keys against that; not
  built). A participant colluding with the aggregator brings only its own pair seeds (it can no
  longer rebuild every mask, as a shared round secret allowed): an update stays hidden while it shares
  a mask with one other honest survivor. Fresh keys per round keep masks from repeating across
  rounds (two updates masked alike leak their difference).
- Dropout after masking: the aggregator `close()`s the round, names the dropped participants, and
  each survivor `reveal_seeds` only the seeds it shared with them; `unmask` removes the unmatched
  masks. A late upload from a dropped participant is ignored. Masks are single (no self-masks as in
  Bonawitz et al.), so an aggregator that received P's update and then named P dropped would unmask
  it alone with the survivors' seeds. Hence commit before upload: P first announces its upload to
  every other participant and sends it only once all of them acknowledged; a participant never
  reveals the seeds of a peer that announced (`reveal_refusal`) and refuses the announcement of a
  peer whose seeds it revealed (`announcement_refusal`). Privacy over liveness: a participant that
  announced and then vanished fails the round, since its masks can no longer be removed.
- Robust checks cannot see through masks: each participant checks (NaN/Inf) and clips its own
  update with `aggregation.clip_update` before masking (`mask_update(..., clip_norm=...)`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .aggregation import AggregationError, clip_update
from .update import AdapterUpdate, UpdateError, decode, encode

FRACTION_BITS = 24
SCALE = float(1 << FRACTION_BITS)
FORMAT = "collm-masked-update/1"
PUBLIC_KEY_BYTES = 32


@dataclass(frozen=True)
class MaskedUpdate:
    participant: str
    round_id: str
    base_sha256: str
    num_samples: int
    masked: dict[str, torch.Tensor]  # int64, the bits of a uint64 in Z_2^64

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.masked.items()}


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """A participant's ephemeral key pair for one round: the private key (keep it in memory only) and
    the raw public key (what the driver relays)."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_map_refusal(me: str, own_public_key: bytes, participants: Collection[str], public_keys: Mapping[str, bytes]) -> str | None:
    """Why `me` must not mask with the relayed `public_keys`, or None. Its own key must be in the map
    unchanged (else the map is not the one its peers hold, or someone swapped keys), every name must be
    a participant it was started with, and there must be a peer to mask with."""
    if public_keys.get(me) != own_public_key:
        return f"the public keys relayed for this round do not hold {me}'s own public key unchanged: keys were swapped or are stale; not masking with them"
    strangers = sorted(set(public_keys) - set(participants))
    if strangers:
        return f"the public keys name {strangers}, who are not participants of this round ({sorted(participants)})"
    if len(public_keys) < 2:
        return f"the public keys name {me} alone: with no peer to mask with, the update would leave in the clear"
    malformed = sorted(p for p, key in public_keys.items() if len(key) != PUBLIC_KEY_BYTES)
    if malformed:
        return f"the public keys of {malformed} are not {PUBLIC_KEY_BYTES}-byte X25519 keys"
    if len(set(public_keys.values())) != len(public_keys):
        return "two participants have the same public key: keys were copied"
    return None


def pair_seed(shared_secret: bytes, round_id: str, a: str, b: str) -> bytes:
    """HKDF-SHA256 of an X25519 shared secret, bound to the round and the (unordered) pair."""
    info = b"collm-secagg" + json.dumps([round_id, *sorted((a, b))]).encode()  # JSON: names cannot run into each other
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def pair_seeds(me: str, private_key: X25519PrivateKey, public_keys: Mapping[str, bytes], round_id: str) -> dict[str, bytes]:
    """The seed `me` shares with every other holder of a public key (both ends derive the same).
    ValueError for a malformed or low-order public key."""
    return {
        peer: pair_seed(private_key.exchange(X25519PublicKey.from_public_bytes(key)), round_id, me, peer) for peer, key in public_keys.items() if peer != me
    }


def _prg(seed: bytes, key: str, numel: int) -> np.ndarray:
    stream = hashlib.shake_256(seed + b"\0" + key.encode()).digest(8 * numel)
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _quantize(delta: torch.Tensor, num_samples: int) -> np.ndarray:
    fixed = torch.round(delta.detach().cpu().double().flatten() * (num_samples * SCALE))
    if fixed.numel() and float(fixed.abs().max()) >= 2.0**62:
        raise UpdateError("update too large for fixed point: clip it (clip_norm) before masking")
    return fixed.to(torch.int64).numpy().view(np.uint64)


def mask_update(update: AdapterUpdate, participants: Sequence[str], pair_seeds: Mapping[str, bytes], *, clip_norm: float | None = None) -> MaskedUpdate:
    """Participant side: check, optionally clip, quantize and mask this participant's own update."""
    me = update.participant
    if me not in participants or len(set(participants)) != len(participants):
        raise ValueError(f"participants must list each name once, {me!r} included; got {list(participants)}")
    peers = [p for p in participants if p != me]
    missing = [p for p in peers if p not in pair_seeds]
    if missing:
        raise ValueError(f"no pair seed for {missing}; derive them with pair_seeds()")
    bad = next((k for k, v in update.delta.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UpdateError(f"{bad} has NaN or Inf values; this update must not be uploaded")
    if clip_norm is not None:
        update = clip_update(update, clip_norm)
    masked = {}
    for key in sorted(update.delta):
        value = _quantize(update.delta[key], update.num_samples)
        for peer in peers:
            mask = _prg(pair_seeds[peer], key, value.size)
            value = value + mask if peer > me else value - mask  # uint64: wraps modulo 2**64
        masked[key] = torch.from_numpy(value.view(np.int64).reshape(update.delta[key].shape))
    return MaskedUpdate(me, update.round_id, update.base_sha256, update.num_samples, masked)


def reveal_refusal(me: str, dropped: Collection[str], announced: Collection[str]) -> str | None:
    """Why `me` must not reveal its seeds with `dropped`, or None. A peer that announced its upload
    may have delivered its masked update; its seeds would let the aggregator unmask it alone."""
    uploading = sorted(set(dropped) & set(announced))
    if not uploading:
        return None
    return (
        f"{me} refuses to reveal the pair seeds it shares with {uploading}: they announced their upload, so the "
        "aggregator may hold their masked update, which these seeds would unmask alone"
    )


def announcement_refusal(me: str, announcer: str, participants: Collection[str], revealed: Collection[str]) -> str | None:
    """Why `me` must not acknowledge `announcer`'s upload, or None. Once `me` revealed the seeds it
    shares with the announcer, an update sent now could be unmasked alone: the announcer must not send it."""
    if announcer == me or announcer not in participants:
        return f"{announcer!r} is not another participant of this round ({sorted(participants)})"
    if announcer in revealed:
        return f"{me} already revealed the pair seed it shares with {announcer} (named dropped): {announcer} must not upload in this round"
    return None


def reveal_seeds(me: str, dropped: Sequence[str], pair_seeds: Mapping[str, bytes]) -> dict[tuple[str, str], bytes]:
    """Survivor side: the seeds `me` shared with the dropped participants, and no others."""
    if me in dropped:
        raise ValueError(f"{me} is named as dropped: it must not reveal seeds for its own update")
    return {(min(me, d), max(me, d)): pair_seeds[d] for d in dropped}


class SecureAggregator:
    """Aggregator side: sums masked updates; sees no single update in the clear."""

    def __init__(self, round_id: str, participants: Sequence[str], *, min_survivors: int = 2) -> None:
        if len(set(participants)) != len(participants) or len(participants) < 2:
            raise ValueError(f"secure aggregation needs >= 2 distinct participants, got {list(participants)}")
        self.round_id, self.participants = round_id, tuple(participants)
        self.min_survivors = min_survivors
        self._received: dict[str, MaskedUpdate] = {}
        self._dropped: frozenset[str] | None = None

    def add(self, masked: MaskedUpdate) -> bool:
        """Take one masked update; False (ignored) once the round is closed. UpdateError if it does not fit."""
        if self._dropped is not None:
            return False
        who = masked.participant
        if masked.round_id != self.round_id or who not in self.participants:
            raise UpdateError(
                f"masked update from {who!r} of round {masked.round_id!r} does not belong to round {self.round_id!r} of {list(self.participants)}"
            )
        if who in self._received:
            raise UpdateError(f"{who} already uploaded a masked update for round {self.round_id}")
        if any(t.dtype != torch.int64 for t in masked.masked.values()):
            raise UpdateError(f"masked update from {who} must hold int64 tensors")
        if self._received:
            first = next(iter(self._received.values()))
            if masked.shapes != first.shapes or masked.base_sha256 != first.base_sha256:
                raise UpdateError(f"masked update from {who} has other keys, shapes or base than {first.participant}'s")
        self._received[who] = masked
        return True

    def missing(self) -> set[str]:
        return set(self.participants) - set(self._received)

    def close(self) -> frozenset[str]:
        """Stop taking uploads; returns the dropped participants, whose pair seeds survivors must reveal."""
        if self._dropped is None:
            self._dropped = frozenset(self.missing())
        return self._dropped

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(sorted(self._received))

    def unmask(self, revealed: Mapping[tuple[str, str], bytes] | None = None) -> dict[str, torch.Tensor]:
        """FedAvg (by num_samples) of the survivors' updates; closes the round if still open."""
        dropped = self.close()
        survivors = self.survivors
        if len(survivors) < self.min_survivors:
            raise AggregationError(
                f"round {self.round_id}: {len(survivors)} masked updates received, secure aggregation needs "
                f">= {self.min_survivors} (fewer would reveal a single update)"
            )
        seeds = {tuple(sorted(pair)): seed for pair, seed in (revealed or {}).items()}
        needed = [(s, d) for s in survivors for d in sorted(dropped)]
        lacking = [pair for pair in needed if tuple(sorted(pair)) not in seeds]
        if lacking:
            raise AggregationError(f"round {self.round_id}: survivors must reveal the seeds shared with dropped {sorted(dropped)}; missing {lacking[:4]}")
        total_samples = sum(self._received[s].num_samples for s in survivors)
        out = {}
        for key, shape in self._received[survivors[0]].shapes.items():
            total = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64)
            for s in survivors:
                total += self._received[s].masked[key].flatten().numpy().view(np.uint64)
            for s, d in needed:  # s added +PRG(s_sd) when d > s and -PRG(s_sd) otherwise: undo that
                mask = _prg(seeds[tuple(sorted((s, d)))], key, total.size)
                total = total - mask if d > s else total + mask
            mean = total.view(np.int64).astype(np.float64) / SCALE / total_samples
            out[key] = torch.from_numpy(mean.astype(np.float32)).reshape(shape)
        return out


def encode_masked(masked: MaskedUpdate) -> bytes:
    meta = {
        "format": FORMAT,
        "participant": masked.participant,
        "round_id": masked.round_id,
        "base_sha256": masked.base_sha256,
        "num_samples": str(masked.num_samples),
    }
    return encode(masked.masked, meta)


def decode_masked(blob: bytes) -> MaskedUpdate:
    tensors, meta = decode(blob)
    if meta.get("format") != FORMAT:
        raise UpdateError(f"not a masked update: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        return MaskedUpdate(meta["participant"], meta["round_id"], meta["base_sha256"], int(meta["num_samples"]), tensors)
    except (KeyError, ValueError) as exc:
        raise UpdateError(f"masked update metadata is incomplete or malformed ({exc!r})") from None
