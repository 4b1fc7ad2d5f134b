"""Tests of lungct.train.ensemble and the model structure helpers of lungct.modelio."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from lungct.errors import UserError
from lungct.modelio import ensemble_members, is_ensemble, load_classifier, logit_model
from lungct.train import models
from lungct.train.calibration import sigmoid
from lungct.train.ensemble import build_ensemble, with_temperature

SIZE = 32
TEMPERATURE = 2.5


def _fold_models(count: int = 2, channels: int = 1) -> list[keras.Model]:
    folds = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        folds.append(models.build_model("baseline", SIZE, SIZE, channels=channels))
    return folds


def _images(count: int = 5, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (count, SIZE, SIZE, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def ensemble() -> tuple[keras.Model, list[keras.Model]]:
    folds = _fold_models(3)
    return build_ensemble(folds, "baseline", TEMPERATURE), folds


def test_ensemble_has_the_contract_structure(ensemble) -> None:
    """image -> fold0..fold2 (each ending at its logit) -> mean_logit -> temperature -> sigmoid."""
    model, _ = ensemble
    assert [layer.name for layer in model.layers] == [
        "image", "fold0", "fold1", "fold2", "mean_logit", "temperature", "probability"]
    assert isinstance(model.get_layer("mean_logit"), keras.layers.Average)
    assert model.get_layer("temperature").scale == pytest.approx(1 / TEMPERATURE)
    assert model.input.dtype == "uint8" and tuple(model.output.shape) == (None, 1)
    members = ensemble_members(model)
    assert [member.name for member in members] == ["fold0", "fold1", "fold2"]
    for member in members:
        assert member.output is member.get_layer("logit").output
        assert member.get_layer("last_conv").name == "last_conv"
    assert is_ensemble(model)


def test_ensemble_predicts_the_sigmoid_of_the_mean_logit_over_t(ensemble) -> None:
    """Its probability equals sigmoid(mean of the fold models' logits / T) to 1e-6."""
    model, folds = ensemble
    images = _images()
    logits = np.mean([logit_model(fold).predict(images, verbose=0)[:, 0] for fold in folds], 0)
    expected = sigmoid(logits, TEMPERATURE)
    assert np.allclose(model.predict(images, verbose=0)[:, 0], expected, atol=1e-6)
    assert np.allclose(logit_model(model).predict(images, verbose=0)[:, 0], logits, atol=1e-6)


def test_members_are_copies_of_the_fold_models(ensemble) -> None:
    """Changing a fold model after the ensemble was built leaves the ensemble unchanged."""
    _, folds = ensemble
    copy = build_ensemble(folds[:2], "baseline")
    images = _images(2)
    before = copy.predict(images, verbose=0)
    dense = folds[0].get_layer("logit")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel + 1.0, bias])
    try:
        assert np.array_equal(copy.predict(images, verbose=0), before)
    finally:
        dense.set_weights([kernel, bias])


def test_saved_ensemble_loads_in_safe_mode_without_lungct(ensemble, tmp_path: Path) -> None:
    """A fresh isolated Python loads the .h5 and .keras in safe mode: same probabilities."""
    model, _ = ensemble
    images = _images()
    np.save(tmp_path / "images.npy", images)
    for kind in ("h5", "keras"):
        model.save(tmp_path / f"ensemble.{kind}")
    code = f"""
        import json, sys
        import keras, numpy as np
        images = np.load({str(tmp_path / "images.npy")!r})
        found = {{}}
        for kind in ("h5", "keras"):
            model = keras.models.load_model({str(tmp_path)!r} + "/ensemble." + kind,
                                            safe_mode=True, compile=False)
            found[kind] = model.predict(images, verbose=0)[:, 0].tolist()
            found[kind + "_layers"] = [layer.name for layer in model.layers]
        found["lungct_imported"] = "lungct" in sys.modules
        print(json.dumps(found))
    """
    completed = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               check=False, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["lungct_imported"] is False
    expected = model.predict(images, verbose=0)[:, 0]
    for kind in ("h5", "keras"):
        assert np.allclose(found[kind], expected, atol=1e-6)
        assert found[kind + "_layers"][1:4] == ["fold0", "fold1", "fold2"]
        loaded = load_classifier(tmp_path / f"ensemble.{kind}", SIZE, "a test")
        assert [m.name for m in ensemble_members(loaded)] == ["fold0", "fold1", "fold2"]


def test_with_temperature_rescales_the_logit_of_a_single_model() -> None:
    """A single model keeps its layers; its probability becomes sigmoid(logit / T)."""
    (model,) = _fold_models(1)
    images = _images(4)
    logits = logit_model(model).predict(images, verbose=0)[:, 0]
    calibrated = with_temperature(model, 4.0)
    assert calibrated.name == "baseline"
    assert [layer.name for layer in calibrated.layers] == [layer.name for layer in model.layers]
    assert np.allclose(calibrated.predict(images, verbose=0)[:, 0], sigmoid(logits, 4.0),
                       atol=1e-6)
    assert np.allclose(model.predict(images, verbose=0)[:, 0], sigmoid(logits), atol=1e-6)
    assert ensemble_members(calibrated) == [calibrated]


def test_three_channel_fold_models_make_a_three_channel_ensemble() -> None:
    """The ensemble takes the fold models' (S, S, 3) input."""
    model = build_ensemble(_fold_models(2, channels=3), "baseline")
    assert tuple(model.input.shape) == (None, SIZE, SIZE, 3)
    assert model.predict(_images(2, channels=3), verbose=0).shape == (2, 1)


def test_grad_cam_layer_of_an_ensemble_names_each_member(ensemble) -> None:
    """One entry per member, '<member>/<layer in the member>'; backbone_of refuses an ensemble."""
    model, _ = ensemble
    assert models.grad_cam_layer(model) == ["fold0/last_conv", "fold1/last_conv",
                                            "fold2/last_conv"]
    assert models.grad_cam_layer(ensemble_members(model)[1]) == "last_conv"
    with pytest.raises(ValueError, match="is an ensemble of 3 members"):
        models.backbone_of(model)


def test_ensemble_needs_two_models_of_one_input_and_a_positive_temperature() -> None:
    """One fold, different inputs and T <= 0 are refused."""
    folds = _fold_models(2)
    with pytest.raises(ValueError, match="at least 2 fold models"):
        build_ensemble(folds[:1], "baseline")
    other = models.build_model("baseline", SIZE + 8, SIZE + 8)
    with pytest.raises(ValueError, match="different inputs"):
        build_ensemble([folds[0], other], "baseline")
    with pytest.raises(ValueError, match="temperature must be positive"):
        build_ensemble(folds, "baseline", temperature=0.0)


def test_a_model_without_the_temperature_head_is_refused_on_load(tmp_path: Path) -> None:
    """A classifier from before schema 2 (logit straight into the sigmoid) is one sentence."""
    image = keras.Input((SIZE, SIZE, 1), dtype="uint8", name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pooling")(
        keras.layers.Rescaling(1 / 255, name="to_float")(image))
    logit = keras.layers.Dense(1, name="logit")(x)
    old = keras.Model(image, keras.layers.Activation("sigmoid", name="probability")(logit))
    old.save(tmp_path / "old.keras")
    with pytest.raises(UserError, match="has no 'temperature' layer before its sigmoid"):
        load_classifier(tmp_path / "old.keras", SIZE, "a test")
