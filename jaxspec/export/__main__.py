"""`python -m jaxspec.export --model=DIR --out=DIR [--formats=savedmodel,tflite]`: see `jaxspec.export`."""

from absl import flags

from jaxspec.cli import run_main, start

_MODEL = flags.DEFINE_string(
    "model",
    None,
    "An exported classifier directory (WORKDIR/models/specialist) or a "
    "routed system's (WORKDIR/models: generalist/ beside specialist directories).",
)
_OUT = flags.DEFINE_string("out", None, "Directory to write (new, or empty).")
_FORMATS = flags.DEFINE_list("formats", ["savedmodel", "tflite"], "Any of savedmodel, tflite.")
_SPECIALISTS = flags.DEFINE_list("specialists", [], "A routed system's specialists to export (default: all).")
flags.mark_flags_as_required(["model", "out"])


def main(argv):
    start(argv)
    from jaxspec.export import export

    record = export(_MODEL.value, _OUT.value, _FORMATS.value, specialists=_SPECIALISTS.value or None)
    for name, model in record["models"].items():
        print(f"{name}: " + ", ".join(f"{_OUT.value}/{f}" for f in model["files"].values()))
    print(f"{_OUT.value}/export.json")


if __name__ == "__main__":
    run_main(main)
