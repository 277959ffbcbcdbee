"""Durable agent state (`--state-dir`): what a replica serves and has learnt outlives its process.

Without it a replica holds its adapters, its shadow and AdamW's state in memory only: when every
pod restarts at once (the operator down, a node drained), the federated adapter is gone. With it:

    <state_dir>/manifest.json                  identity, the retained versions with their labels and sha256,
                                               which one is current, which global the replica rests on
    <state_dir>/adapters/<sha256>.safetensors  the retained versions, content-addressed (AdapterArchive)
    <state_dir>/shadow.pt                      the shadow adapter, AdamW's state, step counters, its global

Every file is replaced atomically (archive.write_atomically), adapter files before the manifest that
names them and removed only after a manifest that no longer does, so a crash at any point leaves a
manifest whose files are all there. The versions on disk are the ones the store's retention keeps
(pins aside) plus the current one and the global. At start a state saved for another model, dtype or
LoRA shape is refused; a file that does not load or whose content does not hash to its name is
skipped, and without the global the replica starts from the initial adapter, as without a state.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .adapter_store import AdapterStore, AdapterVersion, StoreSnapshot, adapter_sha256
from .archive import AdapterArchive, load_archived, write_atomically
from .lora import LoraSpec, ModelDims, check_adapter
from .model_host import dtype_name
from .trainer import ShadowState, Trainer

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
ADAPTERS = "adapters"
SHADOW = "shadow.pt"


def state_identity(model: str, dims: ModelDims, dtype: torch.dtype, spec: LoraSpec) -> dict[str, Any]:
    """What a saved state must match to be restored: adapters of another model or shape cannot serve here."""
    return {
        "model": model,
        "dims": asdict(dims),
        "dtype": dtype_name(dtype),
        "lora": {"rank": spec.rank, "alpha": spec.alpha, "target_modules": list(spec.target_modules)},
    }


def identity_mismatch(saved: Any, expected: Mapping[str, Any]) -> str | None:
    """In words, the first part of a saved identity that differs from this agent's; None when all match."""
    if not isinstance(saved, Mapping):
        return f"no identity (found {saved!r})"
    for key, value in expected.items():
        if saved.get(key) != value:
            return f"{key} {saved.get(key)!r} (this agent: {value!r})"
    return None


def manifest_of(snapshot: StoreSnapshot, identity: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest that describes a store snapshot (JSON-ready)."""

    def entry(v: AdapterVersion) -> dict[str, Any]:
        return {**v.summary(), "created_at": v.created_at}

    return {
        "format": FORMAT,
        "identity": dict(identity),
        "current": entry(snapshot.current),
        "global": entry(snapshot.global_version),
        "revisions": {str(k): v for k, v in sorted(snapshot.revisions.items())},
        "versions": [entry(v) for v in snapshot.versions],
    }


def checkpoint_sha256(state: ShadowState) -> str:
    """A hash over the shadow and AdamW's moments: torch.load does not notice a flipped byte in a tensor."""
    tensors = {f"shadow.{k}": v for k, v in state.shadow.items()}
    for index, moments in state.optimizer["state"].items():
        # flattened: AdamW's step is a 0-dim tensor, which adapter_sha256 cannot view as bytes
        tensors.update({f"optimizer.{index}.{name}": t.reshape(-1) for name, t in moments.items() if isinstance(t, torch.Tensor)})
    return adapter_sha256(tensors)


def _key(entry: Mapping[str, Any]) -> tuple[str, str]:
    """A manifest entry's (label, sha256): two versions may share content, not both."""
    return str(entry["version"]), str(entry["sha256"])


def _describe(entry: Any) -> str:
    if isinstance(entry, Mapping):
        return f"{entry.get('version')} ({str(entry.get('sha256'))[:12]})"
    return repr(entry)


class DurableState:
    def __init__(self, folder: str | Path, identity: Mapping[str, Any], *, replica: str) -> None:
        self.folder = Path(folder)
        self.identity = dict(identity)
        try:
            self.adapters = AdapterArchive(self.folder / ADAPTERS, replica)  # creates both folders
            for leftover in [*self.folder.glob("*.tmp"), *self.adapters.folder.glob("*.tmp")]:
                leftover.unlink(missing_ok=True)  # a write a crash interrupted; the file it was to replace is intact
        except OSError as exc:  # a volume that is not there or not writable: say so at start, not at the first publish
            raise ValueError(f"cannot use state_dir {self.folder}: {exc}") from exc
        self._lock = threading.Lock()  # one writer at a time: store listeners run on any publishing thread
        self._shadow_saved: tuple[int, str] | None = None  # (step, global sha256) of the shadow on disk
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, str] = {}  # what the last write of each kind ("adapters", "shadow") failed with

    @property
    def error(self) -> str:
        """Why the last write failed ("" when the last writes worked): a full or read-only volume shows in the stats."""
        return "; ".join(self._errors.values())

    # -- adapters -----------------------------------------------------------------------------
    def load_adapters(self, spec: LoraSpec, dims: ModelDims) -> StoreSnapshot | None:
        """The saved store, each version verified against its sha256 and this agent's LoRA shape;
        None (with a log line that says why) when there is nothing usable to restore."""
        path = self.folder / MANIFEST
        if not path.exists():
            log.info("no saved state in %s: starting from the initial adapter", self.folder)
            return None
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, this agent reads {FORMAT}")
            mismatch = identity_mismatch(manifest.get("identity"), self.identity)
            if mismatch:
                log.error("the state in %s was saved for another model or LoRA shape: %s; ignoring it (this agent's state replaces it)", self.folder, mismatch)
                return None
            entries = list(manifest["versions"])
            current, global_ = _key(manifest["current"]), _key(manifest["global"])
            revisions = {int(k): int(v) for k, v in manifest["revisions"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("the manifest %s is unreadable (%s); starting from the initial adapter", path, exc)
            return None
        loaded: dict[tuple[str, str], AdapterVersion] = {}
        for number, e in enumerate(entries, 1):
            try:
                tensors = load_archived(self.adapters.folder, e["sha256"])
                check_adapter(tensors, spec, dims)
                eval_loss = None if e.get("eval_loss") is None else float(e["eval_loss"])
                version = AdapterVersion(
                    number,
                    int(e["cluster_version"]),
                    int(e["revision"]),
                    int(e["step"]),
                    e["sha256"],
                    eval_loss,
                    float(e["created_at"]),
                    MappingProxyType(tensors),
                )
                loaded[_key(e)] = version
            except Exception as exc:  # a corrupt file fails in safetensors, torch or our checks alike: skip it, never crash
                log.error("saved adapter %s in %s is unusable: %s; skipping it", _describe(e), self.adapters.folder, exc)
        rests_on = loaded.get(global_)
        if rests_on is None:
            log.error("the global adapter %s the replica rested on did not come back; starting from the initial adapter", global_[0])
            return None
        serving = loaded.get(current)
        if serving is None:
            log.error("the adapter %s it served did not come back; serving its global %s", current[0], rests_on.label)
            serving = rests_on
        log.info("restored %d adapter versions from %s: serving %s (sha256 %s)", len(loaded), self.folder, serving.label, serving.sha256[:12])
        return StoreSnapshot(tuple(loaded.values()), serving, rests_on, revisions)

    def save_adapters(self, store: AdapterStore) -> None:
        """Write the store as it is now (a store listener: runs on the publishing thread). A failure
        is logged, not raised: serving and training go on, and the next change writes again."""
        try:
            with self._lock:
                snapshot = store.snapshot()
                if snapshot is None:
                    return
                for version in snapshot.versions:
                    self.adapters.write(version)  # content-addressed: a version already on disk is not rewritten
                write_atomically(self.folder / MANIFEST, json.dumps(manifest_of(snapshot, self.identity), indent=1).encode())
                kept = {v.sha256 for v in snapshot.versions}
                for path in self.adapters.folder.glob("*.safetensors"):
                    if path.stem not in kept:
                        path.unlink(missing_ok=True)
            self._errors.pop("adapters", None)
        except Exception as exc:
            log.exception("cannot save the adapter versions to %s; they are served, but a restart would not find them", self.folder)
            self._errors["adapters"] = f"cannot save the adapter versions to {self.folder} ({exc}); they are served, but a restart would not find them"

    # -- the shadow ---------------------------------------------------------------------------
    def restore_shadow(self, trainer: Trainer, store: AdapterStore) -> bool:
        """Continue the trainer from the saved shadow and AdamW state, rebased on the store's global
        when the checkpoint rests on an older one; False (logged) when there is nothing usable."""
        path = self.folder / SHADOW
        if not path.exists():
            return False
        try:
            if not zipfile.is_zipfile(path):  # else torch's error suggests weights_only=False, which is not the cure
                raise ValueError("not a complete torch.save checkpoint")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("format") != FORMAT:
                raise ValueError(f"format {saved.get('format')!r}, this agent reads {FORMAT}")
            mismatch = identity_mismatch(saved.get("identity"), self.identity)
            if mismatch:
                log.error("the shadow checkpoint %s was saved for another model or LoRA shape: %s; ignoring it", path, mismatch)
                return False
            state = ShadowState(**{f.name: saved[f.name] for f in fields(ShadowState)})
            if checkpoint_sha256(state) != saved["sha256"]:
                raise ValueError("its tensors do not hash to the sha256 saved with them")
            rests_on = store.find(state.global_sha256)
            if rests_on is None:
                log.error("the shadow checkpoint rests on adapter %s, which did not come back; the shadow starts from the global", state.global_sha256[:12])
                return False
            trainer.restore(state, rests_on)
        except Exception as exc:  # as for adapters: a corrupt checkpoint is skipped, never fatal
            log.error("the shadow checkpoint %s is unusable (%s); the shadow starts from the global", path, exc)
            return False
        self._shadow_saved = (state.step, state.global_sha256)
        rebased = store.global_version
        if rebased is not None and rebased.sha256 != rests_on.sha256:
            trainer.rebase(rebased)  # the global changed after the checkpoint: keep the progress on top of it
        log.info("restored the shadow at step %d from %s (rests on %s)", state.step, path, trainer.global_version.label)
        return True

    def save_shadow(self, trainer: Trainer) -> bool:
        """Checkpoint the shadow unless the one on disk is the same (same step, same global); False
        when nothing was written. Never raises: a failed checkpoint is logged and retried next time."""
        try:
            with self._lock:
                state = trainer.checkpoint()
                if (state.step, state.global_sha256) == self._shadow_saved:
                    return False
                buffer = io.BytesIO()
                torch.save({"format": FORMAT, "identity": self.identity, "sha256": checkpoint_sha256(state), **vars(state)}, buffer)
                write_atomically(self.folder / SHADOW, buffer.getbuffer())
                self._shadow_saved = (state.step, state.global_sha256)
                self._errors.pop("shadow", None)
                return True
        except Exception as exc:
            log.exception("cannot checkpoint the shadow adapter to %s", self.folder)
            self._errors["shadow"] = f"cannot checkpoint the shadow adapter to {self.folder} ({exc}); a restart would lose its recent steps"
            return False

    def keep_checkpointing(self, trainer: Trainer, interval_s: float) -> None:
        """Checkpoint the shadow every `interval_s` seconds from a thread of its own until close()."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.save_shadow(trainer)

        self._thread = threading.Thread(target=run, name="collm-checkpoint", daemon=True)
        self._thread.start()

    def close(self, trainer: Trainer | None) -> None:
        """Stop the periodic checkpoints and take the last one (graceful shutdown, trainer stopped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if trainer is not None:
            self.save_shadow(trainer)
