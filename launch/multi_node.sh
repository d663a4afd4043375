#!/usr/bin/env bash
# Several machines: starts torchrun once per node, with MASTER_ADDR (the first node), MASTER_PORT,
# NNODES and NODE_RANK set, over ssh (a hostfile) or srun (inside a SLURM allocation).
#
#   HOSTFILE=hosts.txt bash launch/multi_node.sh --data /shared/corpus --batch_size 256 --out_dir /shared/run
#       hosts.txt: one hostname (or IP) per line, '#' comments allowed; the first line is the master.
#       Run it from any machine that reaches every host with password-less ssh (ssh -o BatchMode=yes).
#   sbatch -N 4 --gpus-per-node=8 --wrap "bash launch/multi_node.sh --data /shared/corpus --out_dir /shared/run"
#       inside an allocation (no HOSTFILE): the nodes come from SLURM_JOB_NODELIST, srun starts one
#       torchrun per node and NODE_RANK is SLURM_NODEID.
#
# Environment (all optional):
#   GPUS_PER_NODE  processes per node (default: the GPUs of this machine, else 1)
#   MASTER_PORT    rendezvous port on the master (default 29500); MASTER_ADDR overrides the first node
#   SCRIPT         training script (default train_adapt.py)
#   REMOTE_SETUP   shell run on each ssh node before torchrun, e.g. "source ~/venv/bin/activate"
#   DRY_RUN=1      print the per-node commands instead of running them
# Needs: this repository at the same path and the same Python environment on every node; --data
# readable on every node (each node's local rank 0 tokenises into the token cache it sees); --out_dir
# on a shared file system if you want to --resume (rank 0 writes the checkpoints, every rank reads
# them back). --batch_size is global: a multiple of NNODES x GPUS_PER_NODE.
#
# Preemption and time limits (SLURM): put this line in the batch script (or pass it to sbatch)
#   #SBATCH --signal=USR1@120
# SLURM then sends SIGUSR1 120 s before the time limit to every process of the job's steps: the srun
# step below, its bash, torchrun and the training ranks. train_adapt.py catches it on every rank,
# finishes the current step, writes a checkpoint and exits 0; the next job continues it with --resume
# (same --out_dir). Here bash and torchrun ignore USR1 (trap '' USR1, inherited by torchrun), so only the
# training processes act on it: without that, torchrun would die of the signal. Not "B:USR1@120": with B:
# only the batch shell is signalled, and it does not pass the signal on to the ranks. 120 s must cover
# one training step and one checkpoint write; SIGTERM works too, but after SIGTERM SLURM (KillWait) and
# torchrun each give the processes only about 30 s before SIGKILL.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="${SCRIPT:-train_adapt.py}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
  [ "${GPUS_PER_NODE:-0}" -gt 0 ] || GPUS_PER_NODE=1
fi

if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "multi_node.sh: HOSTFILE $HOSTFILE not found" >&2; exit 2; }
  mapfile -t NODES < <(sed 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}')
  MODE=ssh
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MODE=slurm
else
  echo "multi_node.sh: set HOSTFILE=<file with one host per line>, or run inside a SLURM allocation" >&2
  exit 2
fi
NNODES="${#NODES[@]}"
[ "$NNODES" -gt 0 ] || { echo "multi_node.sh: no nodes found" >&2; exit 2; }
MASTER_ADDR="${MASTER_ADDR:-${NODES[0]}}"
ARGS="$(printf '%q ' "$@")"
TORCHRUN="torchrun --nnodes=$NNODES --nproc_per_node=$GPUS_PER_NODE --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT"
echo "multi_node.sh: $NNODES node(s) x $GPUS_PER_NODE process(es), master $MASTER_ADDR:$MASTER_PORT ($MODE)" >&2

if [ "$MODE" = slurm ]; then
  # one task per node; SLURM_NODEID is that node's rank
  CMD="trap \"\" USR1; cd $(printf '%q' "$ROOT") && export MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NNODES=$NNODES NODE_RANK=\$SLURM_NODEID && $TORCHRUN --node_rank=\$SLURM_NODEID $SCRIPT $ARGS"
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "srun --nodes=$NNODES --ntasks=$NNODES --ntasks-per-node=1 bash -c '$CMD'"; exit 0; fi
  exec srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 bash -c "$CMD"
fi

pids=()
for i in "${!NODES[@]}"; do
  node="${NODES[$i]}"
  CMD="trap \"\" USR1; cd $(printf '%q' "$ROOT") && ${REMOTE_SETUP:-true} && export MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT NNODES=$NNODES NODE_RANK=$i && $TORCHRUN --node_rank=$i $SCRIPT $ARGS"
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "ssh $node \"$CMD\""; continue; fi
  ssh -o BatchMode=yes "$node" "$CMD" < /dev/null &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
