"""Server-side Tables (``meta.k8s.io/v1`` ``Table``), which kubectl asks for to print ``get`` / ``get -o wide``.

``build_table`` renders a list of objects with the columns kubectl shows for Pods, StatefulSets,
Deployments, Services, ConfigMaps, Secrets and Events (``TABLE_BUILDERS``), with a custom resource's
``additionalPrinterColumns``, or else with Name and Age.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .matching import jsonpath

if TYPE_CHECKING:
    from .emulator import ResourceType

__all__ = ["TABLE_BUILDERS", "build_table"]

Obj = dict[str, Any]


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    s = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _col(name: str, type_: str = "string", priority: int = 0, fmt: str = "") -> Obj:
    return {"name": name, "type": type_, "format": fmt, "description": "", "priority": priority}


def _pod_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    cstat = status.get("containerStatuses") or []
    ready = sum(1 for c in cstat if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in cstat)
    phase = status.get("phase") or "Pending"
    if (o.get("metadata") or {}).get("deletionTimestamp"):
        phase = "Terminating"
    cols = [
        _col("Name", fmt="name"),
        _col("Ready"),
        _col("Status"),
        _col("Restarts", "string"),
        _col("Age"),
        _col("IP", priority=1),
        _col("Node", priority=1),
        _col("Nominated Node", priority=1),
        _col("Readiness Gates", priority=1),
    ]
    cells = [
        o["metadata"]["name"],
        f"{ready}/{len(spec.get('containers') or [])}",
        phase,
        str(restarts),
        _age(o["metadata"].get("creationTimestamp")),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        "<none>",
        "<none>",
    ]
    return cols, cells


def _workload_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    cols = [_col("Name", fmt="name"), _col("Ready"), _col("Age"), _col("Containers", priority=1), _col("Images", priority=1)]
    cells = [
        o["metadata"]["name"],
        f"{status.get('readyReplicas') or 0}/{spec.get('replicas', 1)}",
        _age(o["metadata"].get("creationTimestamp")),
        ",".join(c.get("name", "") for c in containers),
        ",".join(c.get("image", "") for c in containers),
    ]
    return cols, cells


def _service_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    spec = o.get("spec") or {}
    ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
    cols = [_col("Name", fmt="name"), _col("Type"), _col("Cluster-IP"), _col("External-IP"), _col("Port(s)"), _col("Age"), _col("Selector", priority=1)]
    cells = [
        o["metadata"]["name"],
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP", "None"),
        "<none>",
        ports or "<none>",
        _age(o["metadata"].get("creationTimestamp")),
        ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>",
    ]
    return cols, cells


def _data_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    n = len(o.get("data") or {}) + len(o.get("binaryData") or {})
    return ([_col("Name", fmt="name"), _col("Data", "integer"), _col("Age")], [o["metadata"]["name"], n, _age(o["metadata"].get("creationTimestamp"))])


def _event_cells(o: Obj) -> tuple[list[Obj], list[Any]]:
    inv = o.get("involvedObject") or {}
    return (
        [_col("Last Seen"), _col("Type"), _col("Reason"), _col("Object"), _col("Message")],
        [
            _age(o.get("lastTimestamp") or o["metadata"].get("creationTimestamp")),
            o.get("type", ""),
            o.get("reason", ""),
            f"{(inv.get('kind') or '').lower()}/{inv.get('name', '')}",
            o.get("message", ""),
        ],
    )


TABLE_BUILDERS: dict[str, Callable[[Obj], tuple[list[Obj], list[Any]]]] = {
    "Pod": _pod_cells,
    "StatefulSet": _workload_cells,
    "Deployment": _workload_cells,
    "Service": _service_cells,
    "ConfigMap": _data_cells,
    "Secret": _data_cells,
    "Event": _event_cells,
}


def _printer_cells(rt: ResourceType, o: Obj) -> tuple[list[Obj], list[Any]]:
    cols, cells = [_col("Name", fmt="name")], [o["metadata"]["name"]]
    age_done = False
    for c in rt.printer_columns or []:
        if c.get("jsonPath") == ".metadata.creationTimestamp":
            cols.append(_col(c.get("name", "Age")))
            cells.append(_age(o["metadata"].get("creationTimestamp")))
            age_done = True
            continue
        cols.append(_col(c.get("name", ""), "string", int(c.get("priority", 0))))
        value = jsonpath(o, c.get("jsonPath", ""))
        cells.append("" if value is None else (value if isinstance(value, (int, float, str)) else json.dumps(value)))
    if not age_done:
        cols.append(_col("Age"))
        cells.append(_age(o["metadata"].get("creationTimestamp")))
    return cols, cells


def build_table(objs: list[Obj], rt: ResourceType, include_object: str, resource_version: str) -> Obj:
    """The Table of ``objs``; ``include_object`` is the request's ``includeObject`` (Object, None or Metadata)."""

    def printer_cells(o: Obj):
        return _printer_cells(rt, o)

    def name_and_age(o: Obj):
        return [_col("Name", fmt="name"), _col("Age")], [o["metadata"]["name"], _age(o["metadata"].get("creationTimestamp"))]

    builder = TABLE_BUILDERS.get(rt.kind) if rt.group in ("", "apps") else None
    if rt.printer_columns is not None:
        builder = printer_cells
    if builder is None:
        builder = name_and_age
    rows, cols = [], None
    for o in objs:
        cols, cells = builder(o)
        if include_object == "Object":
            row_obj = o
        elif include_object == "None":
            row_obj = None
        else:
            row_obj = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
        rows.append({"cells": cells, "object": row_obj})
    if cols is None:
        cols, _ = builder({"metadata": {"name": ""}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version}, "columnDefinitions": cols, "rows": rows}
