#!/usr/bin/env bash
# Start main.py under Horovod: one process per GPU on this machine, on several machines, or
# N processes on the CPU. Everything before "--" goes to horovodrun, everything after it to main.py.
#
#   scripts/launch_horovod.sh -- --learner=channel --target-speedup=2.5           # every GPU here
#   scripts/launch_horovod.sh -np 2 -- --learner=channel --target-speedup=2.5     # 2 CPU processes
#   scripts/launch_horovod.sh -np 8 -H host1:4,host2:4 -- --learner=channel ...   # two machines
#   scripts/launch_horovod.sh -np 8 --hostfile hosts.txt -- --learner=channel ... # "host1 slots=4" lines
#   scripts/launch_horovod.sh --dry-run -np 2 -- --learner=channel                # print the command only
#
# Defaults added when not given: -np = the number of GPUs here (nvidia-smi -L), -H localhost:<np>,
# and --gloo (scripts/install.sh builds Horovod with Gloo, without MPI). Other horovodrun options
# (--network-interface eth0, -p 2222 for ssh, --verbose, ...) pass through. See docs/scaling_out.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

horovod_args=()
main_args=()
dry_run=0
np=""
hosts_given=0
controller_given=0
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; main_args=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        --dry-run) dry_run=1; shift ;;
        -np|--num-proc) np="${2:?$1 needs a number}"; shift 2 ;;
        -np=*|--num-proc=*) np="${1#*=}"; shift ;;
        -H|--hosts|-hostfile|--hostfile|--host-discovery-script)
            hosts_given=1; horovod_args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        -H=*|--hosts=*|-hostfile=*|--hostfile=*|--host-discovery-script=*) hosts_given=1; horovod_args+=("$1"); shift ;;
        --gloo|--mpi) controller_given=1; horovod_args+=("$1"); shift ;;
        *) horovod_args+=("$1"); shift ;;
    esac
done

if [ -z "$np" ]; then
    gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "$gpus" -gt 0 ]; then
        np=$gpus
    else
        echo "error: no GPU found on this machine; pass -np N for N processes on the CPU" >&2
        exit 2
    fi
fi
case "$np" in ''|*[!0-9]*|0) echo "error: -np must be a positive number, got '$np'" >&2; exit 2 ;; esac
[ "$hosts_given" = 1 ] || horovod_args+=(-H "localhost:$np")
[ "$controller_given" = 1 ] || horovod_args+=(--gloo)

python="${PYTHON:-python}"
command=(horovodrun -np "$np" "${horovod_args[@]}" "$python" "$root/main.py" "${main_args[@]}")
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
if ! command -v horovodrun >/dev/null 2>&1; then
    echo "error: horovodrun is not on PATH; activate the environment where scripts/install.sh installed Horovod" >&2
    exit 2
fi
exec "${command[@]}"
