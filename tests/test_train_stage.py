"""Tests of training_lung_cnn.py and lungct.train (stage, config, loop, augment)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from test_train_image_cache import write_tiny_dataset

import training_lung_cnn
from lungct import contract
from lungct.errors import UserError
from lungct.modelio import load_classifier, logit_model
from lungct.threshold import youden_threshold
from lungct.train import loop as trainloop
from lungct.train import models, phases
from lungct.train import stage as train
from lungct.train.augment import AugmentationRanges, DeviceAugmentation
from lungct.train.calibration import binary_log_loss, sigmoid
from lungct.train.config import TrainConfig, resolve_config
from lungct.train.image_cache import load_split

CONTRACT_KEYS = {
    "class_names",
    "best_model",
    "selection",
    "threshold",
    "calibration",
    "models",
    "validation",
    "test",
    "config",
    "environment",
    "dataset",
    "model_files",
}
MODEL_KEYS = {
    "history",
    "val_auc",
    "params",
    "weights_source",
    "train_seconds",
    "images_per_second",
    "model_path",
    "validation",
    "test",
}
BLOCK_KEYS = {"paths", "patient_ids", "y_true", "y_prob"}
CALIBRATED_BLOCK_KEYS = BLOCK_KEYS | {"y_prob_uncalibrated"}
CLI_EPOCHS = 2


def _cli_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--models",
        "baseline",
        "--epochs",
        str(CLI_EPOCHS),
        "--batch-size",
        "8",
        "--seed",
        "3",
        "-q",
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The CLI trained the baseline once on a tiny 32 px dataset: (dataset, out, results)."""
    root = tmp_path_factory.mktemp("cli")
    dataset = write_tiny_dataset(root / "output_dataset")
    out = root / "out"
    assert training_lung_cnn.main(_cli_args(dataset, out)) == 0
    results = json.loads((out / "training_results.json").read_text(encoding="utf-8"))
    return dataset, out, results


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and documents the model, weights and preset flags."""
    with pytest.raises(SystemExit) as stopped:
        training_lung_cnn.main(["--help"])
    text = capsys.readouterr().out
    assert stopped.value.code == 0
    for flag in ("--models", "--weights", "--preset", "--fine-tune-layers", "--distribute"):
        assert flag in text


def test_cli_writes_the_training_contract(cli_run: tuple[Path, Path, dict]) -> None:
    """The models, runs/baseline/ and training_results.json exist; the checkpoint is gone."""
    _, out, results = cli_run
    for name in (
        "lung_cancer_cnn_enhanced.h5",
        "lung_cancer_cnn_enhanced.keras",
        "runs/baseline/model.keras",
        "runs/baseline/run.json",
        "runs/baseline/history.csv",
    ):
        assert (out / name).is_file(), name
    assert not (out / "runs/baseline" / trainloop.CHECKPOINT_FILE).exists()
    assert set(results) >= CONTRACT_KEYS
    assert set(results["models"]["baseline"]) >= MODEL_KEYS
    assert results["class_names"] == ["non_cancer", "cancer"]
    assert results["best_model"] == "baseline"
    assert results["model_files"] == {
        "h5": "lung_cancer_cnn_enhanced.h5",
        "keras": "lung_cancer_cnn_enhanced.keras",
    }
    assert results["threshold"]["rule"] == "youden_j_on_calibrated_validation"
    assert results["models"]["baseline"]["model_path"] == "lung_cancer_cnn_enhanced.keras"
    assert results["models"]["baseline"]["grad_cam_layer"] == "last_conv"
    assert "cross_validation" not in results


def test_results_record_predictions_for_every_image(cli_run: tuple[Path, Path, dict]) -> None:
    """Validation and test blocks list each image once, with paths relative to the dataset."""
    dataset, _, results = cli_run
    for key in ("validation", "test"):
        block = results[key]
        assert set(block) == CALIBRATED_BLOCK_KEYS
        assert len(block["paths"]) == len(block["y_prob"]) == 12
        assert sorted(block["y_true"]) == [0] * 6 + [1] * 6
        assert all((dataset / path).is_file() for path in block["paths"])
        assert all(0.0 <= p <= 1.0 for p in block["y_prob"])
    assert results["models"]["baseline"]["test"] == results["test"]


def test_results_record_configuration_and_environment(cli_run: tuple[Path, Path, dict]) -> None:
    """The resolved preset, sizes, seed, dataset and backend are recorded."""
    dataset, _, results = cli_run
    config = results["config"]
    assert config["preset"] == "quick"
    assert (config["image_size"], config["train_size"], config["seed"]) == (32, 32, 3)
    assert (config["folds"], config["channels"]) == (1, 1)
    assert config["dataset_dir"] == str(dataset.resolve())
    assert results["environment"]["backend"] == keras.backend.backend()
    assert results["environment"]["devices"]
    assert results["dataset"] == {"schema_version": contract.SCHEMA_VERSION, "source": "synthetic",
                                  "image_size": 32}


def test_history_csv_has_one_row_per_epoch(cli_run: tuple[Path, Path, dict]) -> None:
    """history.csv and the results' history hold the epochs of the run."""
    _, out, results = cli_run
    with open(out / "runs/baseline/history.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    history = results["models"]["baseline"]["history"]
    assert len(rows) == len(history["epoch"]) <= CLI_EPOCHS
    assert {row["phase"] for row in rows} == {"scratch"}
    assert history["val_auc"][0] == pytest.approx(float(rows[0]["val_auc"]))


def test_saved_models_load_without_lungct_and_reproduce_probabilities(
    cli_run: tuple[Path, Path, dict],
) -> None:
    """A fresh, isolated Python loads the .h5 and .keras in safe mode: same test probabilities."""
    dataset, out, results = cli_run
    code = f"""
        import json, sys
        import cv2, keras, numpy as np
        paths = {results["test"]["paths"]!r}
        images = np.stack([cv2.imread({str(dataset)!r} + "/" + p, 0) for p in paths])[..., None]
        found = {{}}
        for kind in ("h5", "keras"):
            model = keras.models.load_model({str(out)!r} + "/lung_cancer_cnn_enhanced." + kind)
            found[kind] = model.predict(images, verbose=0)[:, 0].tolist()
        found["lungct_imported"] = "lungct" in sys.modules
        print(json.dumps(found))
    """
    completed = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(code)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["lungct_imported"] is False
    for kind in ("h5", "keras"):
        assert np.allclose(found[kind], results["test"]["y_prob"], atol=1e-6)


def test_selected_model_carries_the_temperature_fitted_on_validation(
    cli_run: tuple[Path, Path, dict],
) -> None:
    """T minimises the validation log loss; the selected file has it, runs/ keeps T = 1."""
    dataset, out, results = cli_run
    calibration = results["calibration"]
    assert calibration["method"] == "temperature scaling (Guo et al. 2017)"
    assert calibration["fitted_on"] == "validation logits"
    assert calibration["n"] == 12
    assert calibration["val_log_loss_after"] <= calibration["val_log_loss_before"]
    manifest = contract.read_manifest(dataset)
    test_images = load_split(dataset, manifest, "test").images
    selected = load_classifier(out / "lung_cancer_cnn_enhanced.keras", 32, "a test")
    uncalibrated = load_classifier(out / "runs/baseline/model.keras", 32, "a test")
    assert selected.get_layer("temperature").scale == pytest.approx(
        1 / calibration["temperature"])
    assert uncalibrated.get_layer("temperature").scale == 1.0
    logits = logit_model(uncalibrated).predict(test_images, verbose=0)[:, 0]
    assert np.allclose(results["test"]["y_prob"], sigmoid(logits, calibration["temperature"]),
                       atol=1e-6)
    assert np.allclose(results["test"]["y_prob_uncalibrated"],
                       uncalibrated.predict(test_images, verbose=0)[:, 0], atol=1e-6)
    assert binary_log_loss(logit_model(uncalibrated).predict(
        load_split(dataset, manifest, "val").images, verbose=0)[:, 0],
        results["validation"]["y_true"], calibration["temperature"]) == pytest.approx(
        calibration["val_log_loss_after"], abs=1e-5)


def test_same_seed_reproduces_the_run(cli_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """Training again with the same seed gives the same history and probabilities."""
    dataset, _, results = cli_run
    assert training_lung_cnn.main(_cli_args(dataset, tmp_path)) == 0
    again = json.loads((tmp_path / "training_results.json").read_text(encoding="utf-8"))
    assert again["test"]["y_prob"] == results["test"]["y_prob"]
    assert (
        again["models"]["baseline"]["history"]["loss"]
        == results["models"]["baseline"]["history"]["loss"]
    )


def test_rerun_reuses_the_trained_model(
    cli_run: tuple[Path, Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run with the same configuration reuses runs/baseline/ and records the same."""
    dataset, out, results = cli_run
    capsys.readouterr()
    assert training_lung_cnn.main(_cli_args(dataset, out)[:-1]) == 0
    assert "baseline: reusing" in capsys.readouterr().err
    again = json.loads((out / "training_results.json").read_text(encoding="utf-8"))
    assert again["test"] == results["test"]
    assert again["models"]["baseline"]["history"] == results["models"]["baseline"]["history"]


def _stand_in_backbone(include_top: bool, weights, input_shape, name: str) -> keras.Model:
    """A two-convolution stand-in for a keras.applications backbone (tracing ResNet50 is slow)."""
    image = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, name="conv1")(image)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="relu1")(x)
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    return keras.Model(image, keras.layers.Activation("relu", name="top_relu")(x), name=name)


def test_transfer_model_trains_on_cached_activations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen then fine-tune phases train the top backbone layer and head, never the rest."""
    spec = models.BackboneSpec(_stand_in_backbone, "stand_in.h5", "https://invalid", "top_relu")
    monkeypatch.setitem(models.BACKBONES, "resnet50", spec)
    # Keep the last epoch's weights even if validation AUC fell, to see what training touched.
    monkeypatch.setattr(trainloop.PhaseTracker, "restore_best", lambda self: None)
    dataset = write_tiny_dataset(tmp_path / "output_dataset", {"train": 8, "val": 4, "test": 4})
    results = train.run(
        TrainConfig(
            dataset_dir=dataset,
            out_dir=tmp_path / "out",
            models=("resnet50",),
            weights="none",
            frozen_epochs=1,
            fine_tune_epochs=1,
            fine_tune_layers=2,
            batch_size=8,
            seed=5,
            progress="none",
        )
    )
    keras.utils.set_random_seed(5)
    initial = models.build_model("resnet50", 32, 32).get_layer("resnet50")
    trained = keras.models.load_model(tmp_path / "out/runs/resnet50/model.keras")
    outcome = results["models"]["resnet50"]
    assert outcome["history"]["phase"] == ["frozen", "fine_tune"]
    assert outcome["fine_tuned_layers"] == ["conv2"]
    assert outcome["weights_source"] == "random: --weights none"
    for layer, changed in (("conv1", False), ("bn1", False), ("conv2", True)):
        before = initial.get_layer(layer).get_weights()[0]
        after = trained.get_layer("resnet50").get_layer(layer).get_weights()[0]
        assert (not np.array_equal(before, after)) is changed, layer


def test_transfer_model_trains_on_augmented_images_without_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With cached features off (the full preset), both phases fit the augmented whole model."""
    spec = models.BackboneSpec(_stand_in_backbone, "stand_in.h5", "https://invalid", "top_relu")
    monkeypatch.setitem(models.BACKBONES, "vgg16", spec)
    dataset = write_tiny_dataset(tmp_path / "output_dataset", {"train": 8, "val": 4, "test": 4})
    results = train.run(
        TrainConfig(
            dataset_dir=dataset,
            out_dir=tmp_path / "out",
            models=("vgg16",),
            weights="none",
            cached_features=False,
            frozen_epochs=1,
            fine_tune_epochs=1,
            fine_tune_layers=2,
            batch_size=8,
            progress="none",
        )
    )
    outcome = results["models"]["vgg16"]
    assert outcome["history"]["phase"] == ["frozen", "fine_tune"]
    assert outcome["fine_tuned_layers"] == ["conv2"]
    assert results["config"]["cached_features"] is False


def test_too_many_fine_tune_layers_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More fine-tune layers than the backbone has is refused, naming the limit."""
    spec = models.BackboneSpec(_stand_in_backbone, "stand_in.h5", "https://invalid", "top_relu")
    monkeypatch.setitem(models.BACKBONES, "vgg16", spec)
    dataset = write_tiny_dataset(tmp_path / "output_dataset", {"train": 4, "val": 2, "test": 2})
    config = TrainConfig(
        dataset_dir=dataset,
        out_dir=tmp_path / "out",
        models=("vgg16",),
        weights="none",
        fine_tune_layers=5,
        batch_size=4,
        progress="none",
    )
    with pytest.raises(
        UserError, match=r"--fine-tune-layers 5 is more than vgg16 allows \(4\)"
    ):
        train.run(config)


def test_transfer_models_below_32_px_are_a_user_error(tmp_path: Path) -> None:
    """VGG16 and ResNet50 need 32 px; a smaller --train-size is refused before training."""
    dataset = write_tiny_dataset(tmp_path / "output_dataset", {"train": 4, "val": 2, "test": 2})
    config = TrainConfig(
        dataset_dir=dataset, out_dir=tmp_path / "out", train_size=16, progress="none"
    )
    with pytest.raises(
        UserError, match="vgg16, resnet50 need --train-size 32 or more, got 16"
    ):
        train.run(config)


def _as_three_channels(dataset: Path) -> Path:
    """Rewrite a one-channel dataset as 2.5D: planes (z-D, z, z+D) = rows shifted by -1, 0, 1."""
    for relative in contract.read_manifest(dataset)["path"]:
        grey = contract.read_png(dataset / relative)
        planes = np.stack([np.roll(grey, -1, 0), grey, np.roll(grey, 1, 0)], axis=-1)
        (dataset / relative).write_bytes(contract.encode_png(planes))
    info = contract.read_dataset_info(dataset)
    contract.write_dataset_info(dataset, {**info, "channels": 3, "context_mm": 2.5,
                                          "channel_order": list(contract.CHANNEL_ORDERS[3])})
    return dataset


def test_three_channel_dataset_trains_a_three_channel_model(tmp_path: Path) -> None:
    """dataset.json channels 3: RGB planes in, (S, S, 3) uint8 model, recorded in config."""
    dataset = _as_three_channels(
        write_tiny_dataset(tmp_path / "output_dataset", {"train": 8, "val": 4, "test": 4}))
    loaded = train.load_dataset(dataset)
    assert loaded.channels == 3 and loaded.train.images.shape == (16, 32, 32, 3)
    first = contract.read_png(dataset / loaded.train.paths[0], channels=3)
    assert np.array_equal(loaded.train.images[0], first)
    assert np.array_equal(first[..., 0], np.roll(first[..., 1], -1, 0))
    results = train.run(TrainConfig(dataset_dir=dataset, out_dir=tmp_path / "out",
                                    models=("baseline",), epochs=1, batch_size=8,
                                    progress="none"))
    assert results["config"]["channels"] == 3
    model = load_classifier(tmp_path / "out/lung_cancer_cnn_enhanced.h5", 32, "a test", 3)
    assert model.predict(loaded.test.images, verbose=0)[:, 0] == pytest.approx(
        results["test"]["y_prob"], abs=1e-6)


def test_tracker_restores_the_best_validation_auc_weights(tmp_path: Path) -> None:
    """After a worse epoch, the classifier gets back the weights of the best epoch."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="logit")])
    model.compile(optimizer="adam", loss="mse")
    tracker = trainloop.PhaseTracker(model, tmp_path, verbose=0)
    tracker.set_model(model)
    tracker.start_phase("scratch", 2, images_per_epoch=8)
    best = [weight.copy() for weight in model.get_weights()]
    for val_auc in (0.8, 0.6):
        tracker.on_epoch_begin(0)
        tracker.on_epoch_end(0, {"loss": 1.0, "val_auc": val_auc})
        model.set_weights([weight + 1.0 for weight in model.get_weights()])
    tracker.restore_best()
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), best, strict=True))
    assert tracker.history["val_auc"] == [0.8, 0.6] and tracker.images_trained == 16


def _main_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = training_lung_cnn.main(argv)
    return code, capsys.readouterr().err


def test_missing_dataset_exits_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset folder that does not exist: exit 2, one line, no traceback."""
    code, err = _main_error(_cli_args(tmp_path / "none", tmp_path / "out"), capsys)
    assert code == 2
    assert "does not exist; run prepare_lung_dataset.py first" in err
    assert "Traceback" not in err


def test_unknown_model_name_exits_with_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--models with an unknown name lists the allowed names."""
    argv = _cli_args(tmp_path, tmp_path / "out")
    argv[argv.index("baseline")] = "baseline,inception"
    code, err = _main_error(argv, capsys)
    assert code == 2
    assert "unknown model inception; choose from baseline, vgg16, resnet50" in err


def test_unwritable_output_exits_with_one_sentence(
    cli_run: tuple[Path, Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output path below a regular file cannot be created."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _main_error(_cli_args(cli_run[0], blocker / "out"), capsys)
    assert code == 2
    assert f"output folder {blocker / 'out'} is not writable" in err


def test_split_without_a_class_exits_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A train split without cancer images is refused before any training."""
    dataset = write_tiny_dataset(tmp_path / "output_dataset", {"train": 4, "val": 2, "test": 2})
    manifest = dataset / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(line for line in lines if ",1,cancer,train," not in line) + "\n")
    code, err = _main_error(_cli_args(dataset, tmp_path / "out"), capsys)
    assert code == 2
    assert "the train split has no cancer images" in err


def test_out_of_memory_exits_naming_the_batch_size(
    cli_run: tuple[Path, Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An allocation failure while fitting becomes advice to lower --batch-size."""

    def exhausted(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(phases, "fit_phase", exhausted)
    code, err = _main_error(_cli_args(cli_run[0], tmp_path / "out"), capsys)
    assert code == 2
    assert "out of memory training baseline at --batch-size 8; lower --batch-size" in err


def test_youden_threshold_separates_perfectly_ranked_scores() -> None:
    """With perfect ranking J = 1 at the lowest cancer score, called positive with >=."""
    threshold = youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9]))
    assert threshold["value"] == pytest.approx(0.7)
    assert (threshold["youden_j"], threshold["sensitivity"], threshold["specificity"]) == (
        1.0,
        1.0,
        1.0,
    )
    assert threshold["comparison"] == ">="


def test_youden_threshold_needs_both_classes() -> None:
    """A one-class validation split has no ROC curve: no threshold."""
    assert youden_threshold(np.array([1, 1]), np.array([0.2, 0.8])) is None


def test_auto_preset_is_quick_on_a_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """On a CPU, auto resolves to quick (<= 64 px, 2,000 images); explicit flags win."""
    resolved = resolve_config(TrainConfig(epochs=3), image_size=128, accelerator="cpu")
    assert (resolved.preset, resolved.train_size, resolved.max_train_images) == ("quick", 64, 2000)
    assert (resolved.epochs, resolved.frozen_epochs, resolved.fine_tune_epochs) == (3, 2, 1)
    assert "no GPU: --preset auto uses the quick preset" in caplog.text


def test_auto_preset_is_full_on_a_gpu() -> None:
    """On a GPU, auto resolves to the seed's settings: 224 px, 15 epochs, batch 32."""
    resolved = resolve_config(TrainConfig(), image_size=512, accelerator="gpu")
    assert (resolved.preset, resolved.train_size, resolved.epochs, resolved.batch_size) == (
        "full",
        224,
        15,
        32,
    )
    assert resolved.cached_features is False
    assert dict(resolved.fine_tune_layers_by_model) == {"vgg16": 8, "resnet50": 32}
    assert resolved.gradcam_max_images == 0


def test_preset_is_applied_once_and_flags_win() -> None:
    """The preset fills fine-tune layers per backbone unless --fine-tune-layers is given."""
    quick = resolve_config(TrainConfig(), image_size=64, accelerator="cpu")
    assert dict(quick.fine_tune_layers_by_model) == {"vgg16": 4, "resnet50": 10}
    assert quick.gradcam_max_images == 64
    given = resolve_config(TrainConfig(fine_tune_layers=3, models=("baseline", "vgg16")),
                           image_size=64, accelerator="cpu")
    assert dict(given.fine_tune_layers_by_model) == {"vgg16": 3}
    assert given.fine_tune_layer_count("vgg16") == 3


def test_bad_flag_values_are_user_errors() -> None:
    """Numbers below their minimum and unknown modes are refused with the flag name."""
    with pytest.raises(UserError, match="--batch-size must be at least 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="--distribute 'ring' is not one of"):
        TrainConfig(distribute="ring")
    with pytest.raises(UserError, match="are both 0: nothing to train"):
        TrainConfig(frozen_epochs=0, fine_tune_epochs=0)


def test_model_session_keeps_mixed_precision() -> None:
    """Clearing Keras state between models does not drop the bf16 policy."""
    try:
        train.start_model_session(mixed_precision=True)
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        train.start_model_session(mixed_precision=False)
    assert keras.config.dtype_policy().name == "float32"


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)


def test_augmentation_flip_alone_mirrors_pixels_exactly() -> None:
    """With only a certain flip, the warp maps every pixel onto its mirror image."""
    ranges = AugmentationRanges(
        flip_probability=1.0, rotation_degrees=0.0, zoom_fraction=0.0, contrast_fraction=0.0
    )
    images = _images()
    flipped = keras.ops.convert_to_numpy(DeviceAugmentation(ranges, seed=0)(images, training=True))
    assert flipped.dtype == np.uint8
    assert np.array_equal(flipped, images[:, :, ::-1, :])


def test_augmentation_is_the_identity_at_inference() -> None:
    """Outside training the images pass unchanged."""
    images = _images(1)
    same = keras.ops.convert_to_numpy(DeviceAugmentation(seed=0)(images, training=False))
    assert np.array_equal(same, images)


def test_augmentation_changes_images_within_uint8() -> None:
    """Default ranges change the images, keep uint8 and keep the mean intensity close."""
    images = _images(2)
    changed = keras.ops.convert_to_numpy(DeviceAugmentation(seed=0)(images, training=True))
    assert changed.dtype == np.uint8 and changed.shape == images.shape
    assert not np.array_equal(changed, images)
    assert abs(float(changed.mean()) - float(images.mean())) < 10


def test_non_finite_logits_stop_training_with_one_sentence() -> None:
    """A diverged model (NaN logits) is refused by name before selection and calibration."""
    finite = SimpleNamespace(val_logits=np.zeros(3), test_logits=np.zeros(2))
    diverged = SimpleNamespace(val_logits=np.array([0.1, np.nan, 0.3]), test_logits=np.zeros(2))
    train._check_finite({"baseline": finite})
    with pytest.raises(UserError, match=r"^vgg16 predicts non-finite logits \(training "
                                        r"diverged\); lower --learning-rate"):
        train._check_finite({"baseline": finite, "vgg16": diverged})
