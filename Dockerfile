# syntax=docker/dockerfile:1
# FoldServe images (docs/deploy.md). Targets:
#   serve      (default) `python -m service` on the CPU, no torch; model repository at /models
#   serve-gpu  the same on a CUDA 13 + cuDNN 9 runtime base (docker run --gpus all)
#   train      `python -m training` with torch (CPU wheel), writing model versions to /models
# Every Python package is pinned by deploy/constraints.txt. Build arguments:
#   BASE             base of serve and train: a Python >= 3.11 with venv
#   CUDA_BASE        base of serve-gpu (its Python comes from the distribution)
#   PIP_INDEX_URL    the package index pip installs from
#   TORCH_INDEX_URL  the index torch comes from (train; the CPU build by default)
ARG BASE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31's CUDA provider links libcudart.so.13 and libcublas.so.13.
ARG CUDA_BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

FROM ${BASE} AS train
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /tmp/src/
COPY deploy/constraints.txt /tmp/src/deploy/
COPY service /tmp/src/service
COPY foldserve /tmp/src/foldserve
COPY training /tmp/src/training
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir -c /tmp/src/deploy/constraints.txt \
      --index-url "$TORCH_INDEX_URL" --extra-index-url "$PIP_INDEX_URL" torch \
 && pip install --no-cache-dir -c /tmp/src/deploy/constraints.txt --index-url "$PIP_INDEX_URL" \
      '/tmp/src[train]' \
 && rm -rf /tmp/src \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin foldserve \
 && mkdir /models && chown 10001:10001 /models
USER 10001:10001
WORKDIR /home/foldserve
ENTRYPOINT ["python", "-m", "training"]
CMD ["defaults", "--repository", "/models", "--runs", "/tmp/runs"]

# serve-gpu and serve differ in their base and Python only: keep the rest the same
# (tests/deploy/test_deploy.py compares them).
FROM ${CUDA_BASE} AS serve-gpu
ARG PIP_INDEX_URL=https://pypi.org/simple
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12=3.12.3-* python3.12-venv=3.12.3-* \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /tmp/src/
COPY deploy/constraints.txt /tmp/src/deploy/
COPY service /tmp/src/service
COPY foldserve /tmp/src/foldserve
RUN python3.12 -m venv /opt/venv \
 && pip install --no-cache-dir -c /tmp/src/deploy/constraints.txt --index-url "$PIP_INDEX_URL" \
      '/tmp/src[serve]' \
 && rm -rf /tmp/src \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin foldserve
USER 10001:10001
WORKDIR /home/foldserve
ENV FOLDSERVE_REPOSITORY=/models FOLDSERVE_HOST=0.0.0.0 FOLDSERVE_PORT=8000 FOLDSERVE_GRPC_PORT=8001 FOLDSERVE_PROVIDERS=cuda \
    FOLDSERVE_HEALTH_PORT=8002
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as r; p = os.environ.get('FOLDSERVE_HEALTH_PORT', '0'); r.urlopen('http://127.0.0.1:' + (p if p != '0' else os.environ['FOLDSERVE_PORT']) + '/v2/health/live', timeout=4)"]
CMD ["python", "-m", "service"]

FROM ${BASE} AS serve
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /tmp/src/
COPY deploy/constraints.txt /tmp/src/deploy/
COPY service /tmp/src/service
COPY foldserve /tmp/src/foldserve
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir -c /tmp/src/deploy/constraints.txt --index-url "$PIP_INDEX_URL" \
      '/tmp/src[serve]' \
 && rm -rf /tmp/src \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin foldserve
USER 10001:10001
WORKDIR /home/foldserve
ENV FOLDSERVE_REPOSITORY=/models FOLDSERVE_HOST=0.0.0.0 FOLDSERVE_PORT=8000 FOLDSERVE_GRPC_PORT=8001 FOLDSERVE_PROVIDERS=cpu \
    FOLDSERVE_HEALTH_PORT=8002
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as r; p = os.environ.get('FOLDSERVE_HEALTH_PORT', '0'); r.urlopen('http://127.0.0.1:' + (p if p != '0' else os.environ['FOLDSERVE_PORT']) + '/v2/health/live', timeout=4)"]
CMD ["python", "-m", "service"]
