"""The operator image carries no torch and no agent code: every operator module imports with the tensor
stack and the replica agent absent, as in images/operator.Dockerfile."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import collm_operator

# numpy (and scipy) are in the image: dp-accounting, the privacy accountant, needs them.
ABSENT = ("torch", "transformers", "peft", "safetensors", "gguf", "replica_agent", "collm_bench")


def test_the_operator_imports_without_torch_or_the_agent_installed():
    modules = sorted(f"collm_operator.{m.name}" for m in pkgutil.iter_modules(collm_operator.__path__))
    assert "collm_operator.main" in modules
    # A fresh interpreter in which the tensor stack cannot be imported, as in the operator image.
    script = textwrap.dedent(f"""
        import importlib, sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Absent())
        for module in {modules!r}:
            importlib.import_module(module)
        print("imported", len({modules!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"imported {len(modules)}"
