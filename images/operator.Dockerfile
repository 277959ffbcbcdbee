# The operator image: ghcr.io/collm/collm-operator. No torch and no agent code: the operator is the
# control plane only, three packages (collm_operator, the control core collm_control, the wire
# contract collm_rpc; tests/operator/test_torch_free.py imports it so). Versions come from
# constraints.txt, as in the Makefile.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt ./
COPY operator/requirements.txt operator/requirements.txt
RUN python -m venv /opt/collm \
    && /opt/collm/bin/pip install --no-cache-dir -c constraints.txt -r operator/requirements.txt

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /opt/collm /opt/collm
COPY operator/collm_operator /opt/collm-src/collm_operator
COPY control/collm_control /opt/collm-src/collm_control
COPY rpc/collm_rpc /opt/collm-src/collm_rpc
ENV PATH=/opt/collm/bin:$PATH \
    PYTHONPATH=/opt/collm-src \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
EXPOSE 8080 9108
ENTRYPOINT ["kopf", "run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "-m", "collm_operator.main"]
