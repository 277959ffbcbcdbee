"""The Azure LLM request traces shipped in this folder (README.md: source, license, attribution),
or the folder COLLM_TRACES_DIR names: arrival times and request sizes, for the local mode's
traffic and the benchmarks."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

TRACES_DIR = Path(os.environ.get("COLLM_TRACES_DIR") or Path(__file__).resolve().parent)
CONV_TRACE = TRACES_DIR / "azure_llm_conv_2023.csv"
CODE_TRACE = TRACES_DIR / "azure_llm_code_2023.csv"
DEFAULT_TRACE = CONV_TRACE


@dataclass(frozen=True)
class RequestShape:
    prompt_tokens: int
    output_tokens: int


def trace_path(path: str | Path) -> Path:
    """`path` if the trace file is there; otherwise a clear error (never a silent stand-in)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trace {path} not found: the Azure traces ship in {Path(__file__).resolve().parent}; unset COLLM_TRACES_DIR or copy them there"
        )
    return path


def trace_shapes(
    path: str | Path = DEFAULT_TRACE,
    *,
    prompt_scale: float = 1 / 8,
    output_scale: float = 1 / 4,
    max_prompt: int = 192,
    max_output: int = 64,
    limit: int = 2000,
) -> list[RequestShape]:
    """Prompt and output lengths from an Azure LLM trace, scaled down to what a small model serves."""
    shapes = []
    with open(trace_path(path), newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i >= limit:
                break
            p = min(max_prompt, max(8, int(int(row["ContextTokens"]) * prompt_scale)))
            o = min(max_output, max(4, int(int(row["GeneratedTokens"]) * output_scale)))
            shapes.append(RequestShape(p, o))
    return shapes


@lru_cache(maxsize=4)
def load_arrivals(path: str | Path = CODE_TRACE) -> tuple[float, ...]:
    """Arrival times (seconds from the first) of an Azure LLM trace file (README.md beside this module)."""
    times = []
    with open(trace_path(path)) as f:
        next(f)  # header
        for line in f:
            stamp = line.split(",", 1)[0]
            whole, _, fraction = stamp.partition(".")
            seconds = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
            times.append(seconds + float("0." + fraction) if fraction else seconds)
    return tuple(t - times[0] for t in times)
