#!/usr/bin/env bash
# Submits a multi-node GPU run of jaxspec to SLURM.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm_gpu.sh --nodes=N --gpus-per-node=G --workdir=DIR [options] [-- JAXSPEC_MAIN_FLAGS...]

Writes DIR/JOB_NAME.sbatch and submits it with sbatch. In the job, srun starts
`python -m jaxspec.main` once per GPU (default) or once per node; JAX joins the
processes from srun's environment (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID,
SLURM_STEP_NODELIST), with a coordinator on the first node. If one process
fails, srun stops the others. Resubmitting resumes from the checkpoints in DIR.

Required:
  --nodes=N              number of nodes
  --gpus-per-node=G      GPUs to use on each node
  --workdir=DIR          absolute path on a file system every node mounts (or gs://...)

Options:
  --config=PATH[:ARGS]   config in this repository (default: configs/animals.py)
  --per=gpu|node         one process per GPU (default) or per node (it drives all G GPUs)
  --partition=NAME       SLURM partition
  --account=NAME         SLURM account
  --time=[D-]HH:MM:SS    time limit (default: 04:00:00)
  --cpus-per-task=C      CPUs per process
  --job-name=NAME        (default: jaxspec)
  --python=PATH          interpreter on the nodes (default: python3)
  --dry-run              print the batch script and the sbatch command instead
  -h, --help             show this help

Everything after `--` goes to jaxspec.main, e.g.  -- --config.seed=1
EOF
}

NODES="" GPUS="" WORKDIR="" CONFIG="configs/animals.py" PER=gpu PARTITION="" ACCOUNT="" TIME=04:00:00
CPUS="" JOB_NAME=jaxspec PYTHON=python3 EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --nodes | --nodes=*) NODES=$(value_of "$1") ;;
    --gpus-per-node | --gpus-per-node=*) GPUS=$(value_of "$1") ;;
    --workdir | --workdir=*) WORKDIR=$(value_of "$1") ;;
    --config | --config=*) CONFIG=$(value_of "$1") ;;
    --per | --per=*) PER=$(value_of "$1") ;;
    --partition | --partition=*) PARTITION=$(value_of "$1") ;;
    --account | --account=*) ACCOUNT=$(value_of "$1") ;;
    --time | --time=*) TIME=$(value_of "$1") ;;
    --cpus-per-task | --cpus-per-task=*) CPUS=$(value_of "$1") ;;
    --job-name | --job-name=*) JOB_NAME=$(value_of "$1") ;;
    --python | --python=*) PYTHON=$(value_of "$1") ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (flags for jaxspec.main go after --)" ;;
  esac
  shift
done

require "$NODES" nodes
require "$GPUS" gpus-per-node
require "$WORKDIR" workdir
check_positive_int nodes "$NODES"
check_positive_int gpus-per-node "$GPUS"
[[ -z $CPUS ]] || check_positive_int cpus-per-task "$CPUS"
[[ $PER == gpu || $PER == node ]] || die "--per must be 'gpu' or 'node', got '$PER'"
[[ $WORKDIR == /* || $WORKDIR == gs://?* ]] ||
  die "--workdir '$WORKDIR' must be an absolute path on a shared file system (or gs://...)"
[[ $WORKDIR != *[[:space:]]* ]] || die "--workdir '$WORKDIR' must not contain spaces (#SBATCH lines split on them)"
[[ $TIME =~ ^([0-9]+-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}$ ]] || die "--time '$TIME' is not [D-]HH:MM:SS"
[[ $JOB_NAME =~ ^[-A-Za-z0-9_.]+$ ]] || die "--job-name '$JOB_NAME' may hold only letters, digits, '-', '_', '.'"
check_config "$CONFIG"

if [[ $PER == gpu ]]; then
  # Every process sees all GPUs of its node and JAX picks GPU number SLURM_LOCALID, so no
  # --gpus-per-task here: a task bound to one GPU would see it as GPU 0 and JAX would miss it.
  TASKS=$GPUS DEVICES=""
else
  # One process drives all GPUs of its node; without this JAX would give it only GPU SLURM_LOCALID=0.
  TASKS=1 DEVICES="export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))"
fi
# The batch script and SLURM's log go to the workdir when it is a local path (else to the repository).
[[ $WORKDIR == /* ]] && JOB_DIR=$WORKDIR || JOB_DIR=$REPO_ROOT
SBATCH=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS" --gpus-per-node="$GPUS"
  --time="$TIME" --output="$JOB_DIR/slurm-%j.out")
[[ -n $PARTITION ]] && SBATCH+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SBATCH+=(--account="$ACCOUNT")
SRUN=(srun --kill-on-bad-exit=1)
if [[ -n $CPUS ]]; then
  SBATCH+=(--cpus-per-task="$CPUS")
  SRUN+=(--cpus-per-task="$CPUS")  # srun of Slurm 22.05-23.02 does not take it from the allocation
fi
MAIN=("$PYTHON" -m jaxspec.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")

SCRIPT=$(
  echo "#!/bin/bash"
  printf '#SBATCH %s\n' "${SBATCH[@]}"
  echo "set -euo pipefail"
  echo "cd $(quote "$REPO_ROOT")"
  [[ -z $DEVICES ]] || echo "$DEVICES"
  quote "${SRUN[@]}" "${MAIN[@]}"
)
run mkdir -p "$JOB_DIR"  # sbatch needs --output's directory to exist
write_file "$JOB_DIR/$JOB_NAME.sbatch" "$SCRIPT"
run sbatch --parsable "$JOB_DIR/$JOB_NAME.sbatch"
