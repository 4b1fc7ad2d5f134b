"""Grad-CAM throughput: batched against one image at a time, through the same compiled function.

For each model, one ``lungct.gradcam.GradCam`` (one compiled gradient function, see
``lungct.backend.make_logit_and_feature_grads``) explains the same random uint8 images twice:
in batches of ``--batch-size`` and one image per call. Both shapes are traced before timing;
the median of ``--repeats`` timed passes gives maps per second. Models come from
training_results.json (``--results``) or are built here with random weights following the
model contract (uint8 input, nested ``vgg16``/``resnet50`` backbone, ``logit`` layer).

    python benchmarks/bench_gradcam.py --models baseline vgg16 resnet50 --image-size 64
    KERAS_BACKEND=jax python benchmarks/bench_gradcam.py --output benchmarks/out/cam_jax.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from lungct.cli import add_logging_flags, configure_logging, run_main
from lungct.errors import UserError
from lungct.fileio import atomic_write_json

LOG = logging.getLogger("bench_gradcam")
MODEL_NAMES = ("baseline", "vgg16", "resnet50")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES),
                        help="models to build with random weights (default: all three)")
    parser.add_argument("--results", type=Path, default=None,
                        help="load every model of this training_results.json instead")
    parser.add_argument("--image-size", type=int, default=64, help="input side in px (64)")
    parser.add_argument("--n-images", type=int, default=64, help="images per pass (64)")
    parser.add_argument("--batch-size", type=int, default=64, help="batched call size (64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode (3)")
    parser.add_argument("--cam", choices=("gradcam", "gradcam++"), default="gradcam")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/out/bench_gradcam.json"),
                        help="JSON results (default: %(default)s)")
    add_logging_flags(parser)
    return parser


def contract_model(name: str, size: int):
    """A random-weight model that follows the model contract of stage 2."""
    import keras
    from keras import layers

    images = keras.Input((size, size, 1), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255.0)(images)
    if name == "baseline":
        for block, filters in enumerate((32, 64, 128, 256), start=1):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            if block < 4:
                x = layers.MaxPooling2D()(x)
        x = layers.Activation("linear", name="last_conv")(x)
    else:
        application = {"vgg16": keras.applications.VGG16,
                       "resnet50": keras.applications.ResNet50}[name]
        backbone = application(include_top=False, weights=None, input_shape=(size, size, 3),
                               name=name)
        x = backbone(layers.Concatenate()([x, x, x]), training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    logit = layers.Dense(1, name="logit", dtype="float32")(x)
    return keras.Model(images, layers.Activation("sigmoid", name="probability")(logit),
                       name=name)


def load_models(args: argparse.Namespace) -> dict:
    """Models to time: from training results, or built with random weights."""
    if args.results is None:
        return {name: contract_model(name, args.image_size) for name in args.models}
    from lungct.contract import read_training_results
    from lungct.modelio import load_classifier

    results = read_training_results(args.results)
    size = int(results["config"]["image_size"])
    models = {}
    for name, info in results["models"].items():
        path = args.results.parent / info.get("model_path", "")
        if path.is_file():
            models[name] = load_classifier(path, size, str(args.results))
        else:
            LOG.warning("skipping %s: %s not found", name, path)
    return models


def time_mode(cam, images: np.ndarray, batch_size: int, repeats: int) -> float:
    """Median seconds of ``repeats`` passes over ``images`` at ``batch_size``."""
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        cam.explain(images, batch_size=batch_size)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def bench_model(model, args: argparse.Namespace) -> dict:
    """Trace both shapes, then time batched and one-at-a-time passes."""
    from lungct.gradcam import GradCam

    size = int(model.input.shape[1])
    images = np.random.default_rng(0).integers(0, 256, (args.n_images, size, size, 1),
                                               dtype=np.uint8)
    started = time.perf_counter()
    cam = GradCam(model, method=args.cam)
    cam.explain(images[:args.batch_size], batch_size=args.batch_size)
    first_batched_s = time.perf_counter() - started
    started = time.perf_counter()
    cam.explain(images[:1], batch_size=1)
    first_single_s = time.perf_counter() - started
    batched_s = time_mode(cam, images, args.batch_size, args.repeats)
    single_s = time_mode(cam, images, 1, args.repeats)
    return {
        "layer": cam.layer_name, "feature_map": list(cam.feature_hw), "image_size": size,
        "n_images": args.n_images, "batch_size": args.batch_size, "repeats": args.repeats,
        "build_and_first_batch_s": round(first_batched_s, 3),
        "first_single_call_s": round(first_single_s, 3),
        "batched_maps_per_s": round(args.n_images / batched_s, 2),
        "one_at_a_time_maps_per_s": round(args.n_images / single_s, 2),
        "batched_over_one_at_a_time": round(single_s / batched_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        if min(args.image_size, args.n_images, args.batch_size, args.repeats) < 1:
            raise UserError("--image-size, --n-images, --batch-size and --repeats must be >= 1")
        import keras

        from lungct.backend import environment

        results = {}
        for name, model in load_models(args).items():
            LOG.info("timing %s", name)
            results[name] = bench_model(model, args)
            LOG.info("%s: %s", name, json.dumps(results[name]))
        atomic_write_json(args.output, {
            "benchmark": "gradcam batched vs one at a time, same compiled function",
            "method": args.cam, "keras": keras.__version__, "python": platform.python_version(),
            "environment": environment(), "models": results})
        LOG.info("written %s", args.output)
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
