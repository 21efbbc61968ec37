#!/usr/bin/env bash
# Runs jaxspec on one GPU of this machine.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --workdir=DIR [options] [-- JAXSPEC_MAIN_FLAGS...]

Installs this repository into the interpreter (pip install -e '.[cuda]'), then
runs `python -m jaxspec.main` as a single process on one GPU
(CUDA_VISIBLE_DEVICES=ID, JAXSPEC_DISTRIBUTED=0) from the repository root.
Rerunning the same command (add --no-install) resumes from the checkpoints in DIR.

Required:
  --workdir=DIR          checkpoints, summaries and results.json (a relative DIR is
                         taken from the current directory; gs://... works too)

Options:
  --config=PATH[:ARGS]   config in this repository (default: configs/animals.py)
  --gpu=ID               which GPU (default: 0)
  --python=PATH          interpreter, Python >= 3.11 (default: python3)
  --no-install           skip the pip install (it is already done)
  --dry-run              print the commands instead of running them
  -h, --help             show this help

Everything after `--` goes to jaxspec.main, e.g.  -- --config.seed=1
EOF
}

WORKDIR="" CONFIG="configs/animals.py" GPU=0 PYTHON=python3 INSTALL=1 EXTRA=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --workdir | --workdir=*) WORKDIR=$(value_of "$1") ;;
    --config | --config=*) CONFIG=$(value_of "$1") ;;
    --gpu | --gpu=*) GPU=$(value_of "$1") ;;
    --python | --python=*) PYTHON=$(value_of "$1") ;;
    --no-install) INSTALL=0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (flags for jaxspec.main go after --)" ;;
  esac
  shift
done

require "$WORKDIR" workdir
[[ $GPU =~ ^[0-9]+$ ]] || die "--gpu must be a GPU index like 0, got '$GPU'"
check_config "$CONFIG"
# The run starts in the repository root: relative paths must still mean what they meant here.
[[ $WORKDIR == /* || $WORKDIR == *://* ]] || WORKDIR=$PWD/$WORKDIR
[[ $PYTHON != */* || $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON
((DRY_RUN)) || command -v "$PYTHON" >/dev/null || die "--python '$PYTHON' is not an executable on PATH"

run cd "$REPO_ROOT"
if ((INSTALL)); then
  run "$PYTHON" -m pip install -e ".[cuda]"
fi
run env CUDA_VISIBLE_DEVICES="$GPU" JAXSPEC_DISTRIBUTED=0 \
  "$PYTHON" -m jaxspec.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
