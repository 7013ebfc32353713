#!/usr/bin/env bash
# Builds the peer-benchmark venv (.venv-bench): torch 2.13.0 CPU, imagen-pytorch and
# diffusers pinned in bench/requirements-peers.lock, plus an offline Hugging Face cache
# holding the one T5 config imagen_pytorch reads at import. Usage: bash bench/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$(command -v python3.11 || command -v python3)}"
VENV="${VENV_BENCH:-.venv-bench}"
# Never let pip pick a torch other than the CPU 2.13.0 build the core venv tests against.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --no-deps -c "$CONSTRAINTS" -r bench/requirements-peers.lock
# imagen-pytorch depends on torchvision, but PyPI's torchvision wheel cannot load beside
# CPU torch (`operator torchvision::nms does not exist`) and breaks transformers'
# imports; the lock leaves it out and this removes any copy pulled in by hand.
"${PIP[@]}" uninstall -y torchvision 2>/dev/null || true

# `import imagen_pytorch` reads google/t5-v1_1-base's config through a default argument
# of Unet.__init__. The benchmark passes text embeddings itself, so a local copy of that
# config (d_model 768, as published) in the venv's own HF cache lets it import offline.
HF_HOME_DIR="$VENV/hf-home"
HF_HOME="$HF_HOME_DIR" HF_HUB_OFFLINE=1 "$VENV/bin/python" - "$HF_HOME_DIR" <<'PYEOF'
import os
import sys

from transformers import T5Config

repo = os.path.join(sys.argv[1], "hub", "models--google--t5-v1_1-base")
revision = "0" * 40  # A local snapshot: no hub commit exists for it.
snapshot = os.path.join(repo, "snapshots", revision)
os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
         feed_forward_proj="gated-gelu").save_pretrained(snapshot)
with open(os.path.join(repo, "refs", "main"), "w") as f:
  f.write(revision)
PYEOF
echo "peer venv ready: $VENV (HF cache $HF_HOME_DIR)"
