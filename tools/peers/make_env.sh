#!/usr/bin/env bash
# Make one peer's own virtual environment for tools/bench_peers.py (never the default suite or CI).
#   tools/peers/make_env.sh aimet     -> .venv-aimet     (aimet-torch 2.42.0)
#   tools/peers/make_env.sh modelopt  -> .venv-modelopt  (nvidia-modelopt 0.47.0)
# Each is about 6 GB. torch stays at the project's pinned 2.14.1 (checked at the end).
set -euo pipefail
peer="${1:?usage: make_env.sh aimet|modelopt [VENV_DIR]}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${2:-$root/.venv-$peer}"
case "$peer" in
  aimet) pkgs=("aimet-torch==2.42.0") ;;
  # modelopt imports requests and huggingface_hub without declaring them
  modelopt) pkgs=("nvidia-modelopt==0.47.0" "requests" "huggingface_hub") ;;
  *) echo "make_env.sh: unknown peer '$peer' (aimet or modelopt)" >&2; exit 2 ;;
esac
test -x "$venv/bin/python" || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/pip" install -q "${pkgs[@]}" "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/pip" install -q -e "$root" scikit-learn
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__; print('$peer env ready:', '$venv', 'torch', torch.__version__)"
