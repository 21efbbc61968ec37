"""`python -m jaxspec.predict --model=DIR IMAGE... [--top_k=5]`: see `jaxspec.predict`."""

from absl import flags

from jaxspec.cli import UserError, run_main, start

_MODEL = flags.DEFINE_string(
    "model",
    None,
    "An exported model directory (WORKDIR/models/specialist) or a routed "
    "system's (WORKDIR/models: generalist/ beside specialist directories).",
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes shown per image (classifiers).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per compiled batch.", lower_bound=1)
_SPECIALISTS = flags.DEFINE_list("specialists", [], "A routed system's specialists to use (default: all).")
_CONF = flags.DEFINE_float("conf_thres", 0.25, "Detectors: lowest score kept.", lower_bound=0.0, upper_bound=1.0)
_IOU = flags.DEFINE_float("iou_thres", 0.45, "Detectors: NMS IoU threshold.", lower_bound=0.0, upper_bound=1.0)
flags.mark_flag_as_required("model")


def main(argv):
    start(argv, positional=True)
    if len(argv) < 2:
        raise UserError("name at least one image: python -m jaxspec.predict --model=DIR IMAGE...")
    from jaxspec.predict import format_result, predict

    result = predict(
        _MODEL.value,
        argv[1:],
        top_k=_TOP_K.value,
        batch_size=_BATCH.value,
        specialists=_SPECIALISTS.value or None,
        conf_thres=_CONF.value,
        iou_thres=_IOU.value,
    )
    print(format_result(argv[1:], result))


if __name__ == "__main__":
    run_main(main)
