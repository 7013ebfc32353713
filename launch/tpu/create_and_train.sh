#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, installs this repo on every worker and runs
# launch/train.py on all of them at once (one process per host; jax auto-detects
# the pod through `--multihost`). Re-running it after a preemption resumes from
# the latest complete checkpoint in WORKDIR.
#
#   PROJECT=my-proj ZONE=us-east5-b TPU_NAME=suti-v5e ACCELERATOR=v5litepod-16 \
#   WORKDIR=gs://my-bucket/imagen64 CONFIG=configs/imagen_base64.py \
#   launch/tpu/create_and_train.sh --config.train.batch_size=256
#
# Extra arguments are passed to launch/train.py unchanged.
set -euo pipefail

: "${PROJECT:?set PROJECT (GCP project id)}"
: "${ZONE:?set ZONE (e.g. us-east5-b)}"
: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${WORKDIR:?set WORKDIR (gs:// path shared by all workers)}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
CONFIG="${CONFIG:-configs/imagen_base64.py}"
REPO_URL="${REPO_URL:-https://github.com/example/suti_jax.git}"
REPO_REF="${REPO_REF:-main}"

tpu() {
  gcloud compute tpus tpu-vm "$@" --project="${PROJECT}" --zone="${ZONE}"
}

# Create the slice unless it exists (re-runs after preemption reuse the name).
if ! tpu describe "${TPU_NAME}" >/dev/null 2>&1; then
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
fi

# Quote the extra flags once so they survive the remote shell.
extra_args=""
for arg in "$@"; do
  extra_args+=" $(printf '%q' "${arg}")"
done

# Same commands on every worker: fetch the pinned source, install from the lock
# (jax[tpu] adds libtpu), then train. --multihost makes each process call
# jax.distributed.initialize() with TPU auto-detection.
remote_cmd="set -euo pipefail
if [ ! -d suti_jax ]; then git clone ${REPO_URL} suti_jax; fi
cd suti_jax && git fetch origin && git checkout ${REPO_REF}
python3 -m venv .venv && .venv/bin/pip install -q --no-deps -r requirements.lock
.venv/bin/pip install -q 'jax[tpu]' && .venv/bin/pip install -q --no-deps -e .
.venv/bin/python -m launch.train --config=${CONFIG} --workdir=${WORKDIR} --multihost${extra_args}"

tpu ssh "${TPU_NAME}" --worker=all --command="${remote_cmd}"
