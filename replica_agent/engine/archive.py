"""A folder that keeps every adapter version a replica published, as `<sha256>.safetensors`.

The store keeps a few versions in memory; the archive keeps all of them on disk with their identity
in the safetensors metadata (replica, version label, step, held-out loss). The goodput benchmark
re-scores every request with exactly the version that served it from here, after the run. The
agent's durable state (state.py) keeps the versions it may restart with in such a folder too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from .adapter_store import AdapterVersion, adapter_sha256


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, never a torn
    one: a temporary file in the same folder, fsync, rename over `path`, fsync of the folder (the rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class AdapterArchive:
    def __init__(self, folder: str | Path, replica: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.replica = replica

    def write(self, version: AdapterVersion) -> Path:
        """Write one version (a store listener: runs on the publishing thread), atomically."""
        path = self.folder / f"{version.sha256}.safetensors"
        if path.exists():
            return path
        meta = {
            "replica": self.replica,
            "version": version.label,
            "step": str(version.step),
            "created_at": repr(version.created_at),
            "eval_loss": "" if version.eval_loss is None else repr(version.eval_loss),
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in version.tensors.items()}
        write_atomically(path, safetensors.torch.save(tensors, metadata=meta))
        return path


def load_archived(folder: str | Path, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of an archived version, verified against their sha256."""
    tensors = safetensors.torch.load_file(str(Path(folder) / f"{sha256}.safetensors"))
    actual = adapter_sha256(tensors)
    if actual != sha256:
        raise ValueError(f"archived adapter {sha256[:12]} in {folder} has sha256 {actual[:12]}: the file is corrupt")
    return tensors


def archive_index(folder: str | Path) -> list[dict]:
    """Every archived version's metadata, with its sha256."""
    out = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        out.append({**meta, "sha256": path.stem})
    return out
