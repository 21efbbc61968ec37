"""What every command line does before its work, and how it reports a user's mistake."""

import ast
import os
import pathlib
import re
import runpy
import sys

# TensorFlow only reads data and writes summaries here (tfds, clu); its C++ notices would bury the progress
# line. Errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from jaxspec import sharding  # noqa: E402


class UserError(ValueError):
    """A mistake in what the user named (a path, a file, a flag's value): one line, exit code 2."""


def start(argv, *, tf_defaults: bool = False, positional: bool = False) -> None:
    """Rejects stray arguments (unless the command takes `positional` ones), joins a multi-process run,
    and caches compiled steps on disk.

    TensorFlow's oneDNN kernels announce themselves past TF_CPP_MIN_LOG_LEVEL and speed up TF math that the
    training commands do not run, so they are off there unless the environment says otherwise;
    `tf_defaults` keeps them (the benchmark's tf.data reference). TensorFlow must not be imported yet.
    """
    if len(argv) > 1 and not positional:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not tf_defaults:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # Quiet by default: progress lines, tables and warnings only; `--verbosity=0` brings back absl's INFO
    # lines (checkpointing, metric writers, backend discovery).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
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


ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout an editable install points at


def resolve_config(argv: list[str]) -> list[str]:
    """`argv` with a relative `--config=configs/...` found from any directory: in the working directory
    if it is there, else in the jaxspec checkout; the directory holding `configs/` goes on `sys.path`,
    so the config files' `from configs import common` works wherever the command runs."""
    out = []
    for a in argv:
        if a.startswith("--config="):
            file, sep, arg = a[len("--config=") :].partition(":")
            path = pathlib.Path(file).expanduser()
            if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
                path = ROOT / path
            if not path.exists():
                exit_with(
                    f"--config={file}: no such config file (looked in {pathlib.Path.cwd()} and {ROOT}); "
                    f"shipped configs: {', '.join(shipped_configs())}"
                )
            path = path.resolve()
            holder = next((d for d in path.parents if (d / "configs" / "__init__.py").exists()), None)
            if holder is not None and str(holder) not in sys.path:
                sys.path.insert(0, str(holder))
            a = f"--config={path}{sep}{arg}"
        out.append(a)
    return out


def shipped_configs() -> list[str]:
    """The configs in the checkout, relative to it (`configs/animals.py`, `configs/experiments/table1.py`, ...)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py") if p.name not in ("__init__.py", "common.py")
    )


def config_help() -> str:
    """The --config flag's help: the syntax, and each shipped config with the first line of its docstring."""
    lines = [
        "Path to a config file, optionally with ':arguments' (e.g. configs/animals.py:tiny or",
        ":seed=1; experiment configs take :tiny, :seeds=N, :data=cifar100|imagenet). Shipped configs:",
    ]
    for rel in shipped_configs():
        try:
            doc = ast.get_docstring(ast.parse((ROOT / rel).read_text())) or ""
        except (OSError, SyntaxError):
            doc = ""
        lines.append(f"  {rel}: {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config override error as one line instead of a traceback."""
    argv = resolve_config(argv)
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
