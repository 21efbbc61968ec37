#!/usr/bin/env bash
# Runs jaxspec on a Cloud TPU VM (a pod slice or a single host): create, install, run, delete.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE --workdir=gs://BUCKET/DIR
                         [options] [-- JAXSPEC_MAIN_FLAGS...]

Creates a Cloud TPU VM, copies this repository to every worker and installs it
into ~/jaxspec-venv (pip install -e '.[tpu]'; Python >= 3.11, from apt when the
image has only 3.10), runs `python -m jaxspec.main` on all workers at once (one
process per host; they find each other through the TPU metadata server,
JAXSPEC_DISTRIBUTED=1), then deletes the TPU, also when a stage fails.
Rerunning with --stages=run resumes from the checkpoints in the workdir.

Required:
  --name=NAME            TPU name: lowercase letters, digits and '-'
  --zone=ZONE            e.g. us-central2-b, europe-west4-a
  --accelerator=TYPE     e.g. v4-32, v5litepod-16, v5p-32, v6e-16
  --workdir=gs://B/DIR   shared by all workers: checkpoints, summaries, results.json

Options:
  --config=PATH[:ARGS]   config in this repository (default: configs/animals.py)
  --version=RUNTIME      TPU software version (default: from the accelerator, e.g.
                         tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e)
  --project=ID           gcloud project (default: gcloud's configured project)
  --spot                 create a Spot TPU
  --stages=LIST          comma-separated subset of create,install,run,delete
                         (default: all four, always in that order)
  --keep                 keep the TPU at the end (drops the 'delete' stage)
  --dry-run              print the commands instead of running them
  -h, --help             show this help

Everything after `--` goes to jaxspec.main, e.g.  -- --config.seed=1
EOF
}

NAME="" ZONE="" ACCELERATOR="" WORKDIR="" CONFIG="configs/animals.py" VERSION="" PROJECT="" SPOT=0
STAGES="create,install,run,delete" KEEP=0 EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name | --name=*) NAME=$(value_of "$1") ;;
    --zone | --zone=*) ZONE=$(value_of "$1") ;;
    --accelerator | --accelerator=*) ACCELERATOR=$(value_of "$1") ;;
    --workdir | --workdir=*) WORKDIR=$(value_of "$1") ;;
    --config | --config=*) CONFIG=$(value_of "$1") ;;
    --version | --version=*) VERSION=$(value_of "$1") ;;
    --project | --project=*) PROJECT=$(value_of "$1") ;;
    --stages | --stages=*) STAGES=$(value_of "$1") ;;
    --spot) SPOT=1 ;;
    --keep) KEEP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (flags for jaxspec.main go after --)" ;;
  esac
  shift
done

require "$NAME" name
require "$ZONE" zone
require "$ACCELERATOR" accelerator
require "$WORKDIR" workdir
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME' must be lowercase letters, digits and '-'"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone like us-central2-b"
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator '$ACCELERATOR' is not a TPU type like v4-32"
[[ $WORKDIR == gs://?* ]] || die "--workdir '$WORKDIR' must be a gs:// path: every worker writes to it"
check_config "$CONFIG"
if [[ -z $VERSION ]]; then
  case "$ACCELERATOR" in
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for --accelerator '$ACCELERATOR'; pass --version=RUNTIME" ;;
  esac
fi
declare -A WANT=()
IFS=, read -ra REQUESTED <<<"$STAGES"
((${#REQUESTED[@]})) || die "--stages is empty (use a subset of create,install,run,delete)"
for stage in "${REQUESTED[@]}"; do
  [[ $stage =~ ^(create|install|run|delete)$ ]] || die "--stages: unknown stage '$stage' (use create,install,run,delete)"
  WANT[$stage]=1
done
((KEEP)) && unset 'WANT[delete]'

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project="$PROJECT")

delete_tpu() { run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

if [[ -n ${WANT[create]:-} ]]; then
  create=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  ((SPOT)) && create+=(--spot)
  run "${create[@]}"
fi
# From here on a failure must not leave a paid-for TPU behind.
[[ -n ${WANT[delete]:-} ]] && trap delete_tpu EXIT

# On each worker (ssh starts in the home directory): ~/jaxspec holds the code, ~/jaxspec-venv the environment.
if [[ -n ${WANT[install]:-} ]]; then
  tarball="${TMPDIR:-/tmp}/jaxspec-$NAME.tgz"
  run tar -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude=.venv --exclude='./workdir*' -czf "$tarball" .
  run "${TPU[@]}" scp "$tarball" "$NAME":jaxspec.tgz "${WHERE[@]}" --worker=all
  # jax>=0.7 needs Python >= 3.11; the TPU images (Ubuntu 22.04) ship 3.10 as python3.
  install="set -e; rm -rf jaxspec; mkdir jaxspec; tar -xzf jaxspec.tgz -C jaxspec
py=python3; if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11-venv; py=python3.11; fi
[ -x jaxspec-venv/bin/python ] || \$py -m venv jaxspec-venv
cd jaxspec && ../jaxspec-venv/bin/python -m pip install -q -U pip && ../jaxspec-venv/bin/python -m pip install -q -e '.[tpu]'"
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$install"
fi

if [[ -n ${WANT[run]:-} ]]; then
  main=(../jaxspec-venv/bin/python -m jaxspec.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="cd jaxspec && JAXSPEC_DISTRIBUTED=1 $(quote "${main[@]}")"
fi
