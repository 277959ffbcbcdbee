"""Export an adapter in PEFT's format, loadable by `PeftModel.from_pretrained` on the same base model,
and read such a folder back (`read_peft`: an edge device loads the version its replica serves)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..engine.lora import LoraSpec

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def export_peft(tensors: dict[str, torch.Tensor], spec: LoraSpec, out_dir: str | Path, *, base_model: str, metadata: dict[str, str] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `out_dir` (created if needed).

    Our tensors already use PEFT's state-dict keys; PEFT drops the adapter name from saved keys,
    which is the form kept here.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(weights, str(out / PEFT_WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    (out / PEFT_CONFIG).write_text(json.dumps(spec.peft_config(base_model), indent=2) + "\n")
    return out


def read_peft(directory: str | Path) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """The tensors and LoRA shape of a folder `export_peft` wrote, as they were (same keys and dtypes,
    so the same sha256); ValueError for a folder that is not one."""
    path = Path(directory)
    missing = [str(path / name) for name in (PEFT_CONFIG, PEFT_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is not an exported adapter: it lacks {', '.join(missing)} (write one with `collm adapter export`)")
    config = json.loads((path / PEFT_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path / PEFT_CONFIG} describes a {config.get('peft_type')!r} adapter, not LORA")
    spec = LoraSpec(rank=int(config["r"]), alpha=config["lora_alpha"], target_modules=tuple(config["target_modules"]))
    return load_file(str(path / PEFT_WEIGHTS)), spec
