#!/usr/bin/env bash
# TUSK on a Cloud TPU VM (one host or a multi-host slice): the same module on every worker.
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE
#   launch/tpu_vm.sh train TPU_NAME ZONE --config=configs/clevr6.py --workdir=/mnt/shared/clevr6
#
# setup: packs this repository's committed files (git archive HEAD), copies them
#   to ~/tusk_jax on every worker and installs them with jax[tpu].
# train: runs `python3 -m tusk_jax.main --distributed=cluster ARGS...` on every
#   worker at once (gcloud ... ssh --worker=all); jax.distributed.initialize()
#   reads the slice's workers from the TPU metadata. --workdir must be a folder
#   every worker sees at the same path (a gcsfuse-mounted bucket or Filestore).
# Environment: PROJECT (gcloud --project, optional), DRY_RUN=1 prints the gcloud
# commands instead of running them.
set -euo pipefail

usage() {
  echo "usage: $0 setup TPU_NAME ZONE | $0 train TPU_NAME ZONE [tusk_jax.main flags...]" >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3

gcloud_flags=(--zone="${zone}" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_flags+=(--project="${PROJECT}")
fi

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

case "${action}" in
  setup)
    archive=${TMPDIR:-/tmp}/tusk_jax_$$.tar.gz
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "${archive}" HEAD
    run gcloud compute tpus tpu-vm scp "${archive}" "${tpu}:tusk_jax.tar.gz" "${gcloud_flags[@]}"
    run gcloud compute tpus tpu-vm ssh "${tpu}" "${gcloud_flags[@]}" --command="\
mkdir -p ~/tusk_jax && tar -xzf ~/tusk_jax.tar.gz -C ~/tusk_jax && \
python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ~/tusk_jax"
    ;;
  train)
    args=$(printf '%q ' "$@")
    run gcloud compute tpus tpu-vm ssh "${tpu}" "${gcloud_flags[@]}" \
      --command="cd ~/tusk_jax && python3 -m tusk_jax.main --distributed=cluster ${args}"
    ;;
  *)
    usage
    ;;
esac
