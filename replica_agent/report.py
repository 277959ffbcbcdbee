"""Printing figures of benchmarks and the demo: a JSON file with every number and a table for people."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def machine() -> dict:
    import os

    return {
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_finite(value, path: str = "") -> None:
    """Raise if any number in a nested result is NaN or infinite (a benchmark must not print those)."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"benchmark figure {path} is {value}")


def write_json(result: dict, path: str | None) -> None:
    if not path:
        return
    check_finite(result)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def print_table(title: str, columns: list[str], rows: list[list], *, console: Console | None = None) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    (console or Console(width=max(Console().width, 140))).print(table)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
