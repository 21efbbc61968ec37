"""What every command line does before its work, and how it reports a user's mistake."""

import os
import re
import runpy
import sys

import jax
from absl import app, flags

from jaxspec import sharding

class UserError(ValueError):
    """A mistake in what the user named (a path, a file, a flag's value): one line, exit code 2."""


def start(argv, *, positional: bool = False) -> None:
    """Rejects stray arguments (unless the command takes `positional` ones), joins a multi-process run,
    and caches compiled steps on disk."""
    if len(argv) > 1 and not positional:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sharding.initialize()
    # Compiling the train step takes tens of seconds on CPU; reruns and resumes reuse it.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxspec/jax"))


def exit_with(message: str) -> None:
    print(f"jaxspec: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.a.b=v` of `argv` whose key the config file does not have, explained; else None."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    file, _, arg = path.partition(":")
    try:
        config = runpy.run_path(file)["get_config"](arg or None)
    except Exception:  # noqa: BLE001 -- the config file's own error is reported by the normal path
        return None
    for a in argv:
        m = re.fullmatch(r"--config\.([\w.]+)(?:=(.*))?", a)
        if not m:
            continue
        node, walked = config, []
        for part in m.group(1).split("."):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(walked) or "the config"
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (not a section)"
                return f"--config.{m.group(1)}: unknown key {part!r} in {where}; valid keys: {valid}"
            node, walked = node[part], [*walked, part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config override error as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        exit_with(_unknown_override(argv) or f"bad config override: {str(e).splitlines()[0]}")
    except flags.Error as e:
        exit_with(str(e).splitlines()[0])


def run_main(main) -> None:
    """`app.run(main)`, but user errors (config, workdir, `UserError`) end with their one line and exit code 2."""

    def wrapped(argv):
        try:
            main(argv)
        except ValueError as e:
            from jaxspec import validate  # imported late: nothing may touch a backend before `start`
            from jaxspec.train import workdir

            if not isinstance(e, validate.ConfigError | workdir.WorkdirError | UserError):
                raise
            exit_with(str(e))

    app.run(wrapped, flags_parser=parse_flags)
