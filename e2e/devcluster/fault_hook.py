"""Faults the chaos runner (e2e/chaos) arms in one pod of the dev cluster; inert until armed.

Loaded by the cluster DNS hook (sitecustomize) only in pods of a cluster started with a faults
folder (``Kubelet(faults_dir=...)`` sets COLLM_DEVCLUSTER_FAULTS). The runner arms a fault by writing
``<folder>/<pod name>/<fault>.json``; the first call it matches takes it (renames it to
``<fault>.fired``, so it fires once) and records what it did in that file. Faults:

- ``corrupt-upload`` ``{"round": PREFIX}``: the next upload of a round whose id starts with PREFIX
  leaves this replica with one byte of tensor data flipped in its first chunk, while the header
  still announces the sha256 of the true bytes: the aggregator receives a corrupt chunk.
- ``stall-upload`` ``{"round": PREFIX, "seconds": S}``: the next such upload sends half of its first
  chunk, writes ``<fault>.streaming`` and holds the stream open S seconds before the rest: an
  upload in progress at the aggregator, for the runner to kill the aggregator mid-upload.

It wraps ``collm_rpc.client.AgentClient.upload`` (the participant's gRPC upload) when that module
loads; the bytes are changed on their way into the gRPC stream, so everything the aggregator
does with them is the product's own code. Never imported by replica_agent; ``kubelet.Kubelet``
copies it as ``<workdir>/dns_hook/collm_devcluster_faults.py``.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_DIR = os.environ.get("COLLM_DEVCLUSTER_FAULTS", "")


def _take(fault, round_id):
    """The fault's parameters when it is armed for this pod and round (taken: it fires once), else None."""
    path = os.path.join(_DIR, os.environ.get("HOSTNAME", ""), fault)
    try:
        with open(path + ".json") as f:
            params = json.load(f)
    except (OSError, ValueError):
        return None
    if not str(round_id).startswith(params.get("round", "")):
        return None
    try:
        os.rename(path + ".json", path + ".fired")  # atomic: one upload takes it
    except OSError:
        return None
    return dict(params, path=path)


def _record(params, **what):
    with open(params["path"] + ".fired", "w") as f:
        json.dump(dict({k: v for k, v in params.items() if k != "path"}, at=time.time(), **what), f)


def _copy(message, data):
    out = type(message)()
    out.CopyFrom(message)
    out.data = data
    return out


def _corrupt(messages, params, round_id):
    first = next(messages)
    data = bytearray(first.data)
    header = 8 + int.from_bytes(data[:8], "little")  # a safetensors blob: 8-byte length, JSON header, tensor bytes
    at = header + (len(data) - header) // 2 if header < len(data) else len(data) // 2
    data[at] ^= 0xFF
    _record(params, round_id=round_id, byte=at, chunk_bytes=len(data))
    yield _copy(first, bytes(data))
    yield from messages


def _stall(messages, params, round_id):
    first = next(messages)
    half = len(first.data) // 2
    yield _copy(first, first.data[:half])
    # Runs once gRPC took the first half: the upload is streaming at the aggregator now.
    _record(params, round_id=round_id, sent_bytes=half, total_bytes=len(first.data))
    with open(params["path"] + ".streaming", "w") as f:
        f.write(str(time.time()))
    time.sleep(float(params.get("seconds", 20)))
    yield type(first)(data=first.data[half:])
    yield from messages


_FAULTS = (("corrupt-upload", _corrupt), ("stall-upload", _stall))


def _wrap_upload(original):
    def upload(self, round_id, participant, blob, sha256, *, masked=False):
        taken = next(((t, p) for fault, t in _FAULTS if (p := _take(fault, round_id)) is not None), None)
        if taken is None:
            return original(self, round_id, participant, blob, sha256, masked=masked)
        transform, params = taken
        send = self.stub.UploadUpdate
        self.stub.UploadUpdate = lambda messages, **kwargs: send(transform(iter(messages), params, round_id), **kwargs)
        try:
            return original(self, round_id, participant, blob, sha256, masked=masked)
        finally:
            self.stub.UploadUpdate = send

    upload.__wrapped__ = original
    return upload


class _ClientFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "collm_rpc.client":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.AgentClient.upload = _wrap_upload(module.AgentClient.upload)

        spec.loader.exec_module = exec_and_patch
        return spec


if _DIR:
    sys.meta_path.insert(0, _ClientFinder())
