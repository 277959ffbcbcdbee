"""Cluster DNS for the dev cluster's pods (and its operator), loaded through PYTHONPATH.

The kubelet stand-in keeps a JSON map (file named by COLLM_DEVCLUSTER_DNS) of Service and pod DNS
names (``<svc>.<ns>.svc``, ``<pod>.<subdomain>.<ns>.svc``, with or without ``.cluster.local``) to
loopback pod addresses and Service port -> target port. ``socket.getaddrinfo`` (used by asyncio,
aiohttp, requests, http.client) and gRPC channel targets are resolved through it; other names
resolve as usual.

This file is never imported by replica_agent: ``kubelet.Kubelet`` copies it as
``<workdir>/dns_hook/sitecustomize.py`` (importing it would patch ``socket.getaddrinfo`` in the
importing process).
"""

import importlib.abc
import importlib.machinery
import json
import os
import socket
import sys

_PATH = os.environ.get("COLLM_DEVCLUSTER_DNS", "")
_cache = {"mtime": None, "map": {}}


def _lookup(host):
    if not _PATH or not isinstance(host, str) or "." not in host:
        return None
    try:
        mtime = os.stat(_PATH).st_mtime_ns
        if mtime != _cache["mtime"]:
            with open(_PATH) as f:
                _cache["map"], _cache["mtime"] = json.load(f), mtime
    except (OSError, ValueError):
        return None
    return _cache["map"].get(host.rstrip(".").lower())


_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, port, *args, **kwargs):
    entry = _lookup(host.decode() if isinstance(host, bytes) else host)
    if entry is not None:
        if port is not None:
            port = entry.get("ports", {}).get(str(port), port)
        return _real_getaddrinfo(entry["ip"], port, *args, **kwargs)
    return _real_getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo


def _rewrite_target(target):
    if not isinstance(target, str):
        return target
    prefix = ""
    rest = target
    if rest.startswith("dns:///"):
        prefix, rest = "dns:///", rest[len("dns:///") :]
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, ""
    entry = _lookup(host)
    if entry is None:
        return target
    if port:
        port = str(entry.get("ports", {}).get(port, port))
    return prefix + entry["ip"] + (":" + port if port else "")


def _wrap(fn):
    def wrapper(target, *args, **kwargs):
        return fn(_rewrite_target(target), *args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def _patch_grpc(module):
    for name in ("insecure_channel", "secure_channel"):
        if hasattr(module, name):
            setattr(module, name, _wrap(getattr(module, name)))


class _GrpcFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in ("grpc", "grpc.aio"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_grpc(module)

        loader.exec_module = exec_and_patch
        return spec


if _PATH:
    sys.meta_path.insert(0, _GrpcFinder())

# A cluster started for the chaos runner (Kubelet faults_dir) also loads the fault hook, written
# beside this file; other clusters never do.
if os.environ.get("COLLM_DEVCLUSTER_FAULTS"):
    import collm_devcluster_faults  # noqa: F401
