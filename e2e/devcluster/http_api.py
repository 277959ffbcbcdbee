"""The HTTP side of the API emulator: what kubectl, kopf and the kubernetes clients talk to.

``HttpApiMixin`` (a base of ``emulator.ApiEmulator``) parses requests itself, serves discovery
(``/api``, ``/apis``, ``/version``, just enough ``/openapi/v3``), maps REST verbs on resource paths
(``parse_api_path``) to the emulator's storage methods (``get_object``, ``list_objects``,
``create_object``, ``patch_object``, ``replace_object``, ``delete_object``), serves the ``scale`` and
pod ``log`` subresources and server-side Tables, and streams watches: a ``Watcher`` subscribes before
the snapshot (or the replay from ``?resourceVersion=``) is taken, and the storage side feeds its queue.
Every error is answered as a Kubernetes ``Status``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from typing import TYPE_CHECKING, Any

import aiohttp.web
import kmock

from .errors import ApiError
from .matching import match_fields, match_labels
from .patching import json_patch, merge_patch
from .tables import build_table

if TYPE_CHECKING:
    from .emulator import ResourceType

__all__ = ["HttpApiMixin", "Watcher", "parse_api_path"]

Obj = dict[str, Any]


def parse_api_path(path: str) -> tuple[str, str, str | None, str, str | None, str | None] | None:
    """``/api/v1/namespaces/ns/pods/x/status`` -> (group, version, namespace, plural, name, subresource)."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = "/".join(rest[2:]) or None
    if plural == "namespaces" and name is None and namespace is not None:
        name, namespace = namespace, None
    return group, version, namespace, plural, name, sub


class Watcher:
    """One open watch: the emulator puts its events on ``queue`` (``None`` ends the watch)."""

    def __init__(self, rt_key: tuple[str, str, str], namespace: str | None):
        self.rt_key, self.namespace = rt_key, namespace
        self.queue: asyncio.Queue[Obj | None] = asyncio.Queue()


class HttpApiMixin:
    """The HTTP API of ``emulator.ApiEmulator``, on its storage methods, ``types``, ``rv``,
    ``event_log`` and ``watchers`` (and ``pod_log_reader``, which the kubelet sets)."""

    requests_served = 0  # every HTTP request answered (API calls per minute in collm bench operator-scale)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Our own request parsing: kmock's path parser fails on cluster-scoped collections such as
        # POST /api/v1/namespaces, and kmock keeps every request for assertions (a long-running dev
        # cluster must not).
        body = await raw_request.read()
        text = body.decode("utf-8", "replace")
        data = None
        if body:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        request = kmock.Request(
            method=raw_request.method,
            url=raw_request.url,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            body=body,
            text=text,
            data=data,
            raw_request=raw_request,
        )
        return await self._handle(request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:  # type: ignore[override]
        self.requests_served += 1
        ctype = request.headers.get("Content-Type", "")
        if request.body and ("protobuf" in ctype or "cbor" in ctype):
            # Only JSON is spoken here (kubectl create <generator> / run send protobuf: unsupported).
            return aiohttp.web.json_response(
                ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
                ).status(),
                status=415,
            )
        try:
            return await self._dispatch(request)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            return aiohttp.web.json_response(ApiError(400, "BadRequest", f"{type(e).__name__}: {e}").status(), status=400)
        except Exception as e:  # noqa: BLE001  answer like an API server, never drop the connection
            return aiohttp.web.json_response(ApiError(500, "InternalError", repr(e)).status(), status=500)

    async def _dispatch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/") or "/"
        method = str(request.method.value).upper()
        if method == "GET":
            if path in ("/", ""):
                return self._json({"paths": ["/api", "/api/v1", "/apis", "/version", "/healthz", "/readyz"]})
            if path in ("/healthz", "/readyz", "/livez"):
                return aiohttp.web.Response(text="ok")
            if path == "/version":
                return self._json(
                    {
                        "major": "1",
                        "minor": "31",
                        "gitVersion": "v1.31.0-collm-devcluster",
                        "gitCommit": "0" * 40,
                        "gitTreeState": "clean",
                        "buildDate": "2026-01-01T00:00:00Z",
                        "goVersion": "go1.22",
                        "compiler": "gc",
                        "platform": "linux/amd64",
                    }
                )
            if path == "/api":
                return self._json(
                    {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
                )
            if path == "/apis":
                return self._json(self._group_list())
            if path == "/openapi/v3":
                return self._json({"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}"} for gv in self._group_versions()}})
            if path.startswith("/openapi/v3/"):
                return self._json(self._openapi_v3(path[len("/openapi/v3/") :]))
            if path.startswith("/openapi"):
                raise ApiError(404, "NotFound", "openapi v2 is not served by the dev cluster")
            m = re.fullmatch(r"/apis/([^/]+)", path)
            if m:
                for g in self._group_list()["groups"]:
                    if g["name"] == m.group(1):
                        return self._json({"kind": "APIGroup", "apiVersion": "v1", **g})
                raise ApiError(404, "NotFound", "group not found")
            m = re.fullmatch(r"/api/(v1)|/apis/([^/]+)/([^/]+)", path)
            if m:
                group, version = ("", "v1") if m.group(1) else (m.group(2), m.group(3))
                resources = [d for rt in self.types.values() if rt.group == group and rt.version == version for d in rt.discovery()]
                if not resources:
                    raise ApiError(404, "NotFound", "group version not found")
                return self._json(
                    {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
                )
        parsed = parse_api_path(path)
        if parsed is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        group, version, ns, plural, name, sub = parsed
        rt = self.rt(group, version, plural)
        if not rt.namespaced:
            ns = None
        params = request.params
        if method == "GET" and params.get("watch") in ("true", "1"):
            return await self._watch(request, rt, ns, name)
        if name is None:
            if method == "GET":
                return self._list(request, rt, ns)
            if method == "POST":
                body = self._body(request)
                if params.get("dryRun"):
                    return self._json(body, 201)
                return self._json(self.create_object(rt, body, ns), 201)
            if method == "DELETE":
                objs = self.list_objects(rt, ns, params.get("labelSelector"), params.get("fieldSelector"))
                for o in objs:
                    self.delete_object(rt, o["metadata"].get("namespace"), o["metadata"]["name"])
                return self._json({"kind": rt.kind + "List", "apiVersion": rt.api_version, "metadata": {"resourceVersion": str(self.rv)}, "items": objs})
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a collection")
        if sub == "log" and rt.kind == "Pod" and method == "GET":
            self.get_object(rt, ns, name)
            reader = getattr(self, "pod_log_reader", None)
            text = reader(ns, name, params.get("container")) if reader else ""
            if params.get("tailLines"):
                text = "".join(text.splitlines(keepends=True)[-int(params["tailLines"]) :])
            return aiohttp.web.Response(text=text, content_type="text/plain")
        if sub == "scale":
            return self._scale(request, rt, ns, name, method)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {sub!r} is not served")
        if sub == "status" and "status" not in rt.subresources:
            raise ApiError(404, "NotFound", f"{rt.plural} has no status subresource")
        if method == "GET":
            obj = self.get_object(rt, ns, name)
            return self._table([obj], rt, request) if self._wants_table(request) else self._json(obj)
        if method == "PATCH":
            ctype = request.headers.get("Content-Type", "application/merge-patch+json").split(";")[0].strip()
            kind = {"application/json-patch+json": "json", "application/strategic-merge-patch+json": "strategic", "application/apply-patch+yaml": "apply"}.get(
                ctype, "merge"
            )
            patch = self._body(request)
            if kind == "apply":
                kind = "strategic" if not rt.group or rt.group in ("apps", "policy") else "merge"
                try:
                    self.get_object(rt, ns, name)
                except ApiError:
                    return self._json(self.create_object(rt, patch, ns), 201)
            if params.get("dryRun"):
                return self._json(self.get_object(rt, ns, name))
            return self._json(self.patch_object(rt, ns, name, patch, kind, sub))
        if method == "PUT":
            return self._json(self.replace_object(rt, ns, name, self._body(request), sub))
        if method == "DELETE":
            body = request.data if isinstance(request.data, dict) else {}
            policy = params.get("propagationPolicy") or body.get("propagationPolicy") or "Background"
            if body.get("orphanDependents") is True:
                policy = "Orphan"
            obj = self.delete_object(rt, ns, name, policy)
            return self._json(obj)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed")

    @staticmethod
    def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        data = request.data
        if data is None and request.text:
            try:
                data = json.loads(request.text)
            except ValueError:
                import yaml  # apply-patch+yaml bodies

                data = yaml.safe_load(request.text)
        if data is None:
            raise ApiError(400, "BadRequest", "a request body is required")
        return data

    def _group_list(self) -> Obj:
        groups: dict[str, list[str]] = {}
        for rt in self.types.values():
            if rt.group:
                versions = groups.setdefault(rt.group, [])
                if rt.version not in versions:
                    versions.append(rt.version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                    "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                }
                for g, vs in sorted(groups.items())
            ],
        }

    def _group_versions(self) -> list[str]:
        return sorted({f"apis/{rt.group}/{rt.version}" if rt.group else "api/v1" for rt in self.types.values()})

    def _openapi_v3(self, gv: str) -> Obj:
        """Just enough OpenAPI v3 for kubectl: it sees server-side field validation (no schemas, so
        kubectl validates nothing on the client side and sends ``fieldValidation``, which we accept)."""
        parts = gv.split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        params = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}]
        paths: Obj = {}
        for rt in self.types.values():
            if rt.group != group or rt.version != version:
                continue
            prefix = f"/apis/{group}/{version}" if group else "/api/v1"
            ns_part = "/namespaces/{namespace}" if rt.namespaced else ""
            gvk = {"group": group, "version": version, "kind": rt.kind}
            op = {"x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}}
            paths[f"{prefix}{ns_part}/{rt.plural}/{{name}}"] = {
                "patch": dict(op, **{"x-kubernetes-action": "patch"}),
                "get": dict(op, **{"x-kubernetes-action": "get"}),
            }
            paths[f"{prefix}{ns_part}/{rt.plural}"] = {"post": dict(op, **{"x-kubernetes-action": "post"})}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.31.0"}, "paths": paths, "components": {"schemas": {}}}

    @staticmethod
    def _wants_table(request: kmock.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    def _list(self, request: kmock.Request, rt: ResourceType, ns: str | None) -> aiohttp.web.Response:
        p = request.params
        objs = self.list_objects(rt, ns, p.get("labelSelector"), p.get("fieldSelector"))
        if self._wants_table(request):
            return self._table(objs, rt, request)
        return self._json({"kind": rt.kind + "List", "apiVersion": rt.api_version, "metadata": {"resourceVersion": str(self.rv)}, "items": objs})

    def _table(self, objs: list[Obj], rt: ResourceType, request: kmock.Request) -> aiohttp.web.Response:
        include = request.params.get("includeObject", "Metadata")
        return self._json(build_table(objs, rt, include, str(self.rv)))

    def _scale(self, request: kmock.Request, rt: ResourceType, ns: str | None, name: str, method: str) -> aiohttp.web.Response:
        if "scale" not in rt.subresources:
            raise ApiError(404, "NotFound", f"{rt.plural} has no scale subresource")
        obj = self.get_object(rt, ns, name)
        if method in ("PATCH", "PUT"):
            body = self._body(request)
            ctype = request.headers.get("Content-Type", "")
            scale_now = self._scale_obj(obj)
            new_scale = json_patch(scale_now, body) if "json-patch" in ctype else merge_patch(scale_now, body)
            replicas = (new_scale.get("spec") or {}).get("replicas")
            if replicas is not None:
                obj = self.patch_object(rt, ns, name, {"spec": {"replicas": int(replicas)}})
        return self._json(self._scale_obj(obj))

    @staticmethod
    def _scale_obj(obj: Obj) -> Obj:
        meta = obj["metadata"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0)},
        }

    async def _watch(self, request: kmock.Request, rt: ResourceType, ns: str | None, name: str | None) -> aiohttp.web.StreamResponse:
        p = request.params
        labels, fields = p.get("labelSelector"), p.get("fieldSelector")
        if name:
            fields = ",".join(x for x in (fields, f"metadata.name={name}") if x)
        since = p.get("resourceVersion") or ""
        timeout = float(p.get("timeoutSeconds") or 1800)

        def wanted(event: Obj) -> bool:
            o = event["object"]
            return match_labels(o["metadata"].get("labels") or {}, labels) and match_fields(o, fields)

        # Subscribe first, then take the snapshot or the replay: nothing can fall in between.
        watcher = Watcher(rt.key, ns)
        self.watchers.add(watcher)
        initial: list[Obj]
        if since in ("", "0"):
            initial = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self.list_objects(rt, ns, labels, fields)]
        else:
            start = int(since)
            oldest = self.event_log[0][0] if self.event_log else self.rv + 1
            if start < oldest - 1 and start < self.rv:
                initial = [
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Failure",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {start} ({oldest})",
                        },
                    }
                ]
            else:
                initial = [
                    e
                    for rv, key, e in self.event_log
                    if rv > start and key == rt.key and (ns is None or e["object"]["metadata"].get("namespace") == ns) and wanted(e)
                ]
        if p.get("sendInitialEvents") == "true":  # WatchList (kubectl delete/wait): end the snapshot with a bookmark
            initial = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self.list_objects(rt, ns, labels, fields)]
            initial.append(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": rt.kind,
                        "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": str(self.rv), "annotations": {"k8s.io/initial-events-end": "true"}},
                    },
                }
            )
            since = ""
        replay_rv = self.rv
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            if initial and initial[0]["type"] == "ERROR":
                return response
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), timeout=min(remaining, 30))
                except TimeoutError:
                    continue
                if event is None:
                    break
                if int(event["object"]["metadata"]["resourceVersion"]) <= replay_rv and since not in ("", "0"):
                    continue  # already replayed from the log
                if wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
        except ConnectionResetError:
            pass
        finally:
            self.watchers.discard(watcher)
        try:
            await response.write_eof()
        except Exception:  # noqa: BLE001
            pass
        return response
