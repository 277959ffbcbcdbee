# The operator image: ghcr.io/collm/collm-operator. No torch: the operator is control plane only
# (tests/operator/test_torch_free.py). Versions come from constraints.txt, as in the Makefile.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY replica_agent replica_agent
COPY operator operator
COPY bench bench
RUN python -m venv /opt/collm \
    && /opt/collm/bin/pip install --no-cache-dir -c constraints.txt -r operator/requirements.txt \
    && /opt/collm/bin/pip install --no-cache-dir --no-deps .

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/collm /opt/collm
ENV PATH=/opt/collm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
EXPOSE 8080 9108
ENTRYPOINT ["kopf", "run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "-m", "collm_operator.main"]
