#!/usr/bin/env bash
# mor: one command for everything.
#   bash train.sh [mor.py flags]   set up (first time), then run the pipeline on the embedded default
#   bash train.sh test [pytest args]   set up (first time), then run the fast tests
#   bash train.sh test -m slow   the slow tier (whole-pipeline runs, kill-and-resume, Flower)
# Setup: if the current python3 already imports every package mor needs (e.g. a GPU box with its own
# CUDA torch), it is used as is; otherwise a virtualenv .venv is created from requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# Importable is not enough: the code needs transformers 5.x (pre-encoded image features in every
# VLM forward) and peft (LoRA on real checkpoints). VERSIONS names each one that is too old.
NEEDS="import torch, torchvision, transformers, safetensors, tqdm, pytest, easy_vqa, PIL, numpy, matplotlib, peft"
VERSIONS='
import sys, torch, transformers, peft
from packaging.version import Version as V
need = {"transformers": (transformers, "5.0"), "torch": (torch, "2.4"), "peft": (peft, "0.17")}
bad = [f"{k} {m.__version__} (need >= {v})" for k, (m, v) in need.items() if V(m.__version__.split("+")[0]) < V(v)]
if bad:
    sys.exit("[setup] wrong version: " + ", ".join(bad) + "; pip install -r requirements.txt, or set MOR_PYTHON")'
PY=${MOR_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "$NEEDS" 2>/dev/null; then
    PY=.venv/bin/python
  elif python3 -c "$NEEDS" 2>/dev/null && python3 -c "$VERSIONS"; then
    PY=python3
  else
    echo "[setup] creating .venv and installing requirements.txt (a few minutes, once)" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
      | grep -v "^WARNING: Location" >&2 || true
    .venv/bin/python -c "$NEEDS" || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
    PY=.venv/bin/python
  fi
fi

"$PY" -c "$VERSIONS" || exit 1  # also a MOR_PYTHON or an older .venv: say which version is wrong

# Optional: Flower (requirements-flower.txt) for federation/flower_fed.py and tests/test_flower.py; CI sets
# MOR_FLOWER=1 so those tests run there (without flwr they are skipped with the reason).
if [ "${MOR_FLOWER:-0}" = "1" ] && ! "$PY" -c "import flwr" 2>/dev/null; then
  echo "[setup] installing requirements-flower.txt (about 20-30 s, once)" >&2
  "$PY" -m pip install -q --disable-pip-version-check -r requirements-flower.txt 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  "$PY" -c "import flwr" || { echo "[setup] flwr install failed: see the pip output above" >&2; exit 1; }
fi

if [ "${1:-}" = "test" ]; then
  shift
  # The fast tier unless a marker expression is given (e.g. `bash train.sh test -m slow`).
  case " $* " in *" -m "*) exec "$PY" -m pytest -q tests "$@" ;; esac
  exec "$PY" -m pytest -q tests -m "not slow" "$@"
fi
exec "$PY" mor.py "$@"
