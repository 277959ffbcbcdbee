"""Export an adapter in PEFT's format, loadable by `PeftModel.from_pretrained` on the same base model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

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
