# Shared by the launch scripts (sourced, never run): errors, --dry-run, argument checks.
# shellcheck shell=bash

DRY_RUN=0
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Exits with status 2 and a message that names the bad input.
die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$0" >&2
  exit 2
}

# Its arguments as one shell-quoted line: plain words as they are, anything else in single quotes.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# Runs a command, or under --dry-run prints it (quoted, ready to paste).
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

# Writes $2 to file $1, or under --dry-run prints the here-document that would.
write_file() {
  if ((DRY_RUN)); then
    printf "cat > %q <<'EOF'\n%s\nEOF\n" "$1" "$2"
  else
    printf '%s\n' "$2" >"$1"
  fi
}

# The value of a --key=VALUE argument; a bare --key is an error that says how to pass it.
value_of() {
  [[ $1 == *=* ]] || die "option '$1' needs a value: $1=VALUE"
  printf '%s' "${1#*=}"
}

require() {  # require VALUE OPTION_NAME
  [[ -n $1 ]] || die "missing required option --$2"
}

check_positive_int() {  # check_positive_int OPTION_NAME VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "--$1 must be a positive integer, got '$2'"
}

# A config path relative to the repository root, optionally with ':ARGS' (e.g. configs/animals.py:tiny).
check_config() {
  local file=${1%%:*}
  [[ -f "$REPO_ROOT/$file" && $file != /* ]] ||
    die "--config file '$file' not found in $REPO_ROOT (give a path relative to the repository root)"
}
