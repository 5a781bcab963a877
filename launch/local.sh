#!/usr/bin/env bash
# N processes of `python -m tusk_jax.main` on this machine, talking over 127.0.0.1.
#
#   launch/local.sh NUM_PROCESSES --config=configs/tetrominoes.py:test --workdir=/tmp/tusk_2p
#
# Every argument after NUM_PROCESSES goes to tusk_jax.main unchanged; this script
# adds --coordinator_address, --num_processes and --process_id. It is for testing
# the multi-process code path on one machine (CPU by default: JAX_PLATFORMS=cpu);
# real clusters use slurm.sbatch or tpu_vm.sh. Environment:
#   DEVICES_PER_PROCESS  CPU devices each process drives (default 1).
#   PORT                 coordinator port (default: a free port chosen here).
#   PYTHON               interpreter (default: python).
#   GRACE_SECONDS        after a failure, how long the others get to stop after
#                        SIGTERM before SIGKILL (default 30).
# Exits with the first non-zero exit status of a process; if one process fails,
# the others are stopped (they would otherwise wait in a collective). Ctrl-C or
# SIGTERM to this script: every process writes a checkpoint of the same step and
# stops; running the same command again resumes.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [tusk_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
# Ctrl-C / SIGTERM: every process saves a checkpoint and stops; keep waiting for them.
interrupted=0
trap 'interrupted=1; stop_all' INT TERM

for ((i = 0; i < num_processes; i++)); do
  "$python" -m tusk_jax.main "$@" \
    --coordinator_address="127.0.0.1:${port}" \
    --num_processes="${num_processes}" \
    --process_id="${i}" &
  pids+=("$!")
done

first_failure=0
while [[ -n "$(jobs -rp)" ]]; do
  code=0
  wait -n || code=$?
  # 127: no child left; > 128 after our trap: the wait was interrupted, not a process exit.
  if ((code == 0 || code == 127 || first_failure != 0)) || ((interrupted && code > 128)); then
    continue
  fi
  first_failure=$code
  echo "local.sh: a process exited with status ${code}; stopping the others." >&2
  stop_all
  # A process blocked in a collective with the failed one may not see SIGTERM.
  for ((s = 0; s < ${GRACE_SECONDS:-30}; s++)); do
    [[ -n "$(jobs -rp)" ]] || break
    sleep 1
  done
  for pid in $(jobs -rp); do
    kill -KILL "$pid" 2>/dev/null || true
  done
done

status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  if ((status == 0 && code != 0)); then
    status=$code
  fi
done
exit "$((first_failure != 0 ? first_failure : status))"
