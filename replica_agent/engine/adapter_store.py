"""Immutable adapter versions, their identity, the "current" pointer, per-request pinning.

Identity: a served adapter is `<cluster version>.<local revision>` plus its sha256. The cluster
version is the federated round that published a global adapter (0 before any round); the local
revision counts what this replica published on top of that global from its own training (0 is the
global itself). `7.3` is the third local revision on top of global version 7. The same label names
the adapter in response headers, stream events, stats, metrics, gRPC and the CollmCluster status.
Each version also has a store-internal `number` (a serial that keys pins and LoRA slab slots); it
is never shown to users.

Publishing snapshots tensors into a new version and flips "current" under one lock, so a request
admitted at any moment pins either the old or the new version, never a mix. A pinned version is
never dropped; an unpinned one that is not current stays only while the retention window keeps it
(for rollback and for peers that fetch it). The global the replica rests on is always kept.

`snapshot()` and `restore()` carry a store across a restart (state.py writes and reads them): the
retained versions with their labels, "current", the global, and the last local revision per
cluster version, so the next revision after a restart gets the next label, not a reused one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from collm_control.stats import AdapterRef


def adapter_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash over names, dtypes, shapes and bytes, in name order (stable across processes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def version_label(cluster_version: int, revision: int) -> str:
    return f"{cluster_version}.{revision}"


@dataclass(frozen=True)
class AdapterVersion:
    number: int  # store-internal serial (pins, slab slots); users see `label`
    cluster_version: int
    revision: int
    step: int
    sha256: str
    eval_loss: float | None
    created_at: float
    tensors: Mapping[str, torch.Tensor] = field(repr=False, compare=False)

    @property
    def label(self) -> str:
        """The version as users see it: `<cluster version>.<local revision>`."""
        return version_label(self.cluster_version, self.revision)

    @property
    def is_global(self) -> bool:
        return self.revision == 0

    def ref(self) -> AdapterRef:
        """This version as the agent's stats name it."""
        return AdapterRef(self.label, self.cluster_version, self.sha256, self.revision, self.eval_loss)

    def summary(self) -> dict:
        return {
            "version": self.label,
            "cluster_version": self.cluster_version,
            "revision": self.revision,
            "sha256": self.sha256,
            "step": self.step,
            "eval_loss": self.eval_loss,
        }


class UnknownVersion(KeyError):
    pass


def retained_numbers(numbers: Iterable[int], retain: int, *, keep: Iterable[int | None] = ()) -> set[int]:
    """The versions a store holds on to: the newest `retain` by number, plus `keep` (current, global, pinned)."""
    return set(sorted(numbers)[-retain:]) | {n for n in keep if n is not None}


@dataclass(frozen=True)
class StoreSnapshot:
    """What a restart needs of a store: the retained versions (oldest first, pins aside), the current
    one, the global it rests on, and the last local revision published on each cluster version."""

    versions: tuple[AdapterVersion, ...]
    current: AdapterVersion
    global_version: AdapterVersion
    revisions: Mapping[int, int]


class AdapterStore:
    def __init__(self, *, retain: int = 8) -> None:
        if retain < 1:
            raise ValueError("adapter retention must keep at least 1 version")
        self.retain = retain
        self._lock = threading.Lock()
        self._versions: dict[int, AdapterVersion] = {}
        self._pins: dict[int, int] = {}
        self._current: int | None = None
        self._global: AdapterVersion | None = None
        self._revisions: dict[int, int] = {}  # cluster version -> last local revision published on it
        self._next = 1
        self._listeners: list[Callable[[AdapterVersion], object]] = []

    # -- publishing ---------------------------------------------------------------------------
    def publish(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        cluster_version: int | None = None,
        step: int = 0,
        eval_loss: float | None = None,
        on_global: str | None = None,
    ) -> AdapterVersion | None:
        """Snapshot `tensors` into a new immutable version and make it current atomically.

        With `cluster_version` it is a global adapter (revision 0) and becomes the global this
        replica rests on. Without, it is the next local revision on top of the current global (the
        first publish of an empty store is global version 0). `on_global` (a sha256) makes a local
        revision conditional: if the global changed since the caller took its snapshot, nothing is
        published and None is returned (the snapshot rests on an adapter that is no longer the base).
        """
        frozen = {k: v.detach().clone().requires_grad_(False) for k, v in tensors.items()}
        digest = adapter_sha256(frozen)
        with self._lock:
            if cluster_version is None and on_global is not None and (self._global is None or self._global.sha256 != on_global):
                return None
            if cluster_version is None and self._global is not None:
                base = self._global.cluster_version
                revision = self._revisions.get(base, 0) + 1
            else:
                base, revision = (0 if cluster_version is None else cluster_version), 0
            if cluster_version is not None and cluster_version < 0:
                raise ValueError(f"a cluster version is >= 0, got {cluster_version}")
            version = AdapterVersion(self._next, base, revision, step, digest, eval_loss, time.time(), MappingProxyType(frozen))
            self._next += 1
            self._versions[version.number] = version
            self._revisions[base] = max(self._revisions.get(base, 0), revision)
            if revision == 0:
                self._global = version
            self._current = version.number
            self._prune_locked()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(version)
        return version

    def rollback(self, number: int) -> AdapterVersion:
        """Make a retained version current again (new requests pin it; running ones keep theirs).
        Rolling back to a global version makes it the global again; its later revisions get new labels."""
        with self._lock:
            version = self._get_locked(number)
            self._current = number
            if version.is_global:
                self._global = version
            listeners = list(self._listeners)
        for listener in listeners:
            listener(version)
        return version

    def restore(self, snapshot: StoreSnapshot) -> AdapterVersion:
        """Take over a snapshot (of an earlier process) into this empty store, labels and numbers as
        they are; listeners are not called (nothing changed). Returns the current version."""
        versions = {v.number: v for v in snapshot.versions}
        if len(versions) != len(snapshot.versions) or not versions:
            raise ValueError("a store snapshot needs versions with distinct numbers")
        if versions.get(snapshot.current.number) is not snapshot.current or versions.get(snapshot.global_version.number) is not snapshot.global_version:
            raise ValueError("the current and global versions of a snapshot must be among its versions")
        if not snapshot.global_version.is_global:
            raise ValueError(f"the global of a snapshot must be a global version, got {snapshot.global_version.label}")
        with self._lock:
            if self._versions:
                raise RuntimeError("restore needs an empty store")
            self._versions = versions
            self._current, self._global = snapshot.current.number, snapshot.global_version
            self._revisions = dict(snapshot.revisions)
            for v in versions.values():
                self._revisions[v.cluster_version] = max(self._revisions.get(v.cluster_version, 0), v.revision)
            self._next = max(versions) + 1
            return snapshot.current

    def on_change(self, listener: Callable[[AdapterVersion], object]) -> None:
        """Call `listener(version)` after every publish or rollback (from the publishing thread)."""
        with self._lock:
            self._listeners.append(listener)

    # -- pinning ------------------------------------------------------------------------------
    def pin_current(self) -> AdapterVersion | None:
        """Read the current version and hold it in one step; None before the first publish."""
        with self._lock:
            if self._current is None:
                return None
            self._pins[self._current] = self._pins.get(self._current, 0) + 1
            return self._versions[self._current]

    def pin(self, sha256: str) -> AdapterVersion | None:
        """Hold the newest retained version with this content hash, current or not (an edge session
        pins the version it opened with, whatever is published meanwhile); None when none is retained."""
        with self._lock:
            version = self._find_locked(sha256)
            if version is not None:
                self._pins[version.number] = self._pins.get(version.number, 0) + 1
            return version

    def release(self, number: int) -> None:
        with self._lock:
            count = self._pins.get(number, 0)
            if count <= 0:
                raise RuntimeError(f"adapter version {number} released more often than pinned")
            if count == 1:
                del self._pins[number]
            else:
                self._pins[number] = count - 1
            self._prune_locked()

    # -- reading ------------------------------------------------------------------------------
    @property
    def current(self) -> AdapterVersion | None:
        with self._lock:
            return None if self._current is None else self._versions[self._current]

    @property
    def global_version(self) -> AdapterVersion | None:
        """The global (cluster) adapter this replica rests on: the last one published with a cluster version."""
        with self._lock:
            return self._global

    def get(self, number: int) -> AdapterVersion:
        with self._lock:
            return self._get_locked(number)

    def find(self, sha256: str) -> AdapterVersion | None:
        """The newest retained version with this content hash, if any."""
        with self._lock:
            return self._find_locked(sha256)

    def live_versions(self) -> set[int]:
        """Versions in use: the current one and every pinned one."""
        with self._lock:
            live = set(self._pins)
            if self._current is not None:
                live.add(self._current)
            return live

    def pins(self) -> dict[int, int]:
        with self._lock:
            return dict(self._pins)

    def retained(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def snapshot(self) -> StoreSnapshot | None:
        """The store as a restart should find it (None before the first publish): what retention keeps
        without counting pins, which only matter to requests of this process."""
        with self._lock:
            if self._current is None or self._global is None:
                return None
            keep = retained_numbers(self._versions, self.retain, keep=(self._current, self._global.number))
            return StoreSnapshot(
                tuple(self._versions[n] for n in sorted(keep)), self._versions[self._current], self._global, MappingProxyType(dict(self._revisions))
            )

    def _get_locked(self, number: int) -> AdapterVersion:
        try:
            return self._versions[number]
        except KeyError:
            raise UnknownVersion(f"adapter version {number} is not retained (retained: {sorted(self._versions)})") from None

    def _find_locked(self, sha256: str) -> AdapterVersion | None:
        matches = [v for v in self._versions.values() if v.sha256 == sha256]
        return max(matches, key=lambda v: v.number) if matches else None

    def _prune_locked(self) -> None:
        keep = retained_numbers(self._versions, self.retain, keep=(*self._pins, self._current, self._global.number if self._global else None))
        for number in [n for n in self._versions if n not in keep]:
            del self._versions[number]
