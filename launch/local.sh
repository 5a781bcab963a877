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
# the others are stopped (they would otherwise wait in a collective).
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
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  "$python" -m tusk_jax.main "$@" \
    --coordinator_address="127.0.0.1:${port}" \
    --num_processes="${num_processes}" \
    --process_id="${i}" &
  pids+=("$!")
done

status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  code=0
  wait -n || code=$?
  remaining=$((remaining - 1))
  if ((code != 0)); then
    status=$code
    echo "local.sh: a process exited with status ${code}; stopping the others." >&2
    cleanup
    # A process blocked in a collective with the failed one may not see SIGTERM.
    for ((s = 0; s < ${GRACE_SECONDS:-30}; s++)); do
      [[ -n "$(jobs -rp)" ]] || break
      sleep 1
    done
    for pid in $(jobs -rp); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    wait || true
    break
  fi
done
exit "$status"
