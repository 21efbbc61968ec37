#!/usr/bin/env bash
# Runs the reproduction's grids (RESULTS.md) one after another, each in its own workdir, and collects each
# grid's numbers into results/.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/reproduce.sh --root=DIR [options]

Runs `python -m jaxspec.experiments` for each grid of the reproduction in the
order the claims are answered (the classifiers' c1 c9_skd c4_methods
c3_semantic c2_routed c5_forgetting c6_cka lesion, then the detectors'
detector_claims t7_freezing), in DIR/<grid>, from the repository root; after
each grid, `python -m jaxspec.experiments.results --collect` copies its cells
into results/<grid> and rewrites RESULTS.md.

A grid's workdir first receives the grid's committed cells (results/<grid>/cells),
so a fresh machine resumes where the committed numbers end, and copies of the
generalists (`checkpoints/generalist*`) that an earlier grid of the same recipe
trained, so that seeds share one generalist per recipe; each phase's
fingerprint check refuses a copy that does not match. Nothing a workdir already
has is overwritten: rerunning the same command resumes at the first unfinished cell.

Required:
  --root=DIR             one workdir per grid below DIR (relative: from the current directory)

Options:
  --only=G1,G2           run only these grids (names as above), in the order above
  --results=DIR          the committed grids to resume from and collect into (default: results/
                         of this checkout)
  --seed-from=DIR        a C1 sweep workdir whose checkpoints seed DIR/c1 (its seeds' generalists,
                         animals specialists and controls at the chosen setting are then restored)
  --python=PATH          interpreter (default: python3)
  --dry-run              print the commands instead of running them
  -h, --help             show this help
EOF
}

# name|config|the earlier grid that trained its generalists ("": none has its recipe)|what to copy from there
GRIDS=(
  "c1|configs/experiments/c1.py||"
  "c9_skd|configs/experiments/skd.py||"
  "c4_methods|configs/experiments/methods.py:seeds=5|c1|generalist*"
  "c3_semantic|configs/experiments/c3_semantic.py|c1|generalist*"
  "c2_routed|configs/experiments/table2.py:seeds=5|c1|generalist*"
  "c5_forgetting|configs/experiments/forgetting.py|c1|generalist*"
  "c6_cka|configs/experiments/c6_cka.py|c4_methods|generalist* cell-group=animals,method=extract,seed=*"
  "lesion|configs/experiments/lesion.py|c1|generalist*"
  "detector_claims|configs/experiments/detector_claims.py:full||"
  "t7_freezing|configs/experiments/table7.py:full|detector_claims|backbone generalist*"
)

ROOT="" ONLY="" SEED_FROM="" PYTHON=python3 RESULTS=$REPO_ROOT/results
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --root | --root=*) ROOT=$(value_of "$1") ;;
    --only | --only=*) ONLY=$(value_of "$1") ;;
    --results | --results=*) RESULTS=$(value_of "$1") ;;
    --seed-from | --seed-from=*) SEED_FROM=$(value_of "$1") ;;
    --python | --python=*) PYTHON=$(value_of "$1") ;;
    --dry-run) DRY_RUN=1 ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done

require "$ROOT" root
NAMES=()
for entry in "${GRIDS[@]}"; do NAMES+=("${entry%%|*}"); done
if [[ -n $ONLY ]]; then
  IFS=, read -ra WANTED <<<"$ONLY"
  for name in "${WANTED[@]}"; do
    [[ " ${NAMES[*]} " == *" $name "* ]] || die "--only: unknown grid '$name'; choose from ${NAMES[*]}"
  done
fi
[[ -z $SEED_FROM || -d $SEED_FROM/checkpoints ]] || die "--seed-from '$SEED_FROM' has no checkpoints/ directory"
# The runs start in the repository root: relative paths must still mean what they meant here.
[[ $ROOT == /* ]] || ROOT=$PWD/$ROOT
[[ $RESULTS == /* ]] || RESULTS=$PWD/$RESULTS
[[ -z $SEED_FROM || $SEED_FROM == /* ]] || SEED_FROM=$PWD/$SEED_FROM
[[ $PYTHON != */* || $PYTHON == /* ]] || PYTHON=$PWD/$PYTHON
((DRY_RUN)) || command -v "$PYTHON" >/dev/null || die "--python '$PYTHON' is not an executable on PATH"

# Copies the checkpoint directories matching the patterns $3... from workdir $1 into workdir $2, keeping
# what $2 already has.
seed_checkpoints() {
  local from=$1/checkpoints to=$2/checkpoints pattern dir
  shift 2
  [[ -d $from ]] || return 0
  run mkdir -p "$to"
  for pattern in "$@"; do
    for dir in "$from"/$pattern; do
      [[ -d $dir && ! -e $to/$(basename "$dir") ]] && run cp -R "$dir" "$to/"
    done
  done
  return 0
}

# Copies the committed cells of grid $1 into workdir $2, keeping the cells $2 already has.
resume_cells() {
  local from=$RESULTS/$1/cells to=$2/cells cell
  [[ -d $from ]] || return 0
  run mkdir -p "$to"
  for cell in "$from"/*.json; do
    [[ -f $cell && ! -e $to/$(basename "$cell") ]] && run cp "$cell" "$to/"
  done
  return 0
}

run cd "$REPO_ROOT"
for entry in "${GRIDS[@]}"; do
  IFS='|' read -r name config donor patterns <<<"$entry"
  [[ -z $ONLY || ",$ONLY," == *",$name,"* ]] || continue
  workdir=$ROOT/$name
  resume_cells "$name" "$workdir"
  if [[ $name == c1 && -n $SEED_FROM ]]; then
    seed_checkpoints "$SEED_FROM" "$workdir" "*"
  elif [[ -n $donor ]]; then
    read -ra globs <<<"$patterns"
    seed_checkpoints "$ROOT/$donor" "$workdir" "${globs[@]}"
  fi
  command="python -m jaxspec.experiments --config=$config --workdir=$workdir"
  run "$PYTHON" -m jaxspec.experiments --config="$config" --workdir="$workdir"
  run "$PYTHON" -m jaxspec.experiments.results --collect="$workdir" --name="$name" --command="$command" \
    --results="$RESULTS"
done
