"""Selecting objects the way the API server does: pure functions on JSON objects.

- ``match_labels``: a label selector string (``a=b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x)``).
- ``match_selector_obj``: a LabelSelector object (``matchLabels`` + ``matchExpressions``).
- ``match_fields``: a field selector string (``metadata.name=x``, ``status.phase!=Running``), through ``dig``.
- ``dig``: a dotted path into nested dicts; ``jsonpath``: the small JSONPath of printer columns.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["match_labels", "match_selector_obj", "match_fields", "dig", "jsonpath"]

Obj = dict[str, Any]


_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(sel: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def match_labels(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in _split_selector(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values if key in labels else False):
                if op == "in" or key in labels:
                    return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_selector_obj(labels: dict[str, str], selector: Obj | None) -> bool:
    """A LabelSelector object (matchLabels + matchExpressions)."""
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def dig(obj: Any, dotted: str) -> Any:
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def match_fields(obj: Obj, selector: str | None) -> bool:
    if not selector:
        return True
    for term in _split_selector(selector):
        neg = "!=" in term
        key, value = term.replace("==", "=").split("!=" if neg else "=", 1)
        actual = dig(obj, key.strip())
        actual = "" if actual is None else str(actual)
        if (actual == value.strip()) == neg:
            return False
    return True


def jsonpath(obj: Any, path: str) -> Any:
    """A tiny JSONPath: ``.a.b``, ``[0]``, ``[?(@.type=="Ready")]`` (first match)."""
    tokens = re.findall(r"\[\?\(@\.([\w.]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]|\[(\d+)\]|\.?([\w-]+)", path)
    cur = obj
    for fkey, fval, idx, name in tokens:
        if cur is None:
            return None
        if fkey:
            cur = next((x for x in cur if isinstance(x, dict) and str(dig(x, fkey)) == fval), None) if isinstance(cur, list) else None
        elif idx:
            cur = cur[int(idx)] if isinstance(cur, list) and int(idx) < len(cur) else None
        else:
            cur = cur.get(name) if isinstance(cur, dict) else None
    return cur
