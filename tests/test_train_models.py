"""Tests for lungct.train.models (contract, frozen sets, weights) and lungct.backend (gradients)."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from lungct import backend
from lungct.errors import UserError
from lungct.train import models


@pytest.fixture(scope="module")
def vgg16_model() -> keras.Model:
    return models.build_model("vgg16", 40, 32)


@pytest.fixture(scope="module")
def resnet50_model() -> keras.Model:
    return models.build_model("resnet50", 32, 32)


def _trainable_layer_names(backbone: keras.Model) -> list[str]:
    return [layer.name for layer in backbone.layers if layer.trainable_weights]


def test_baseline_follows_the_input_and_output_contract() -> None:
    """uint8 (S, S, 1) named "image" in, one float32 probability out, logit before sigmoid."""
    model = models.build_model("baseline", 48, 48)
    assert model.input.dtype == "uint8"
    assert tuple(model.input.shape) == (None, 48, 48, 1)
    assert model.layers[0].name == "image"
    assert tuple(model.output.shape) == (None, 1)
    logit, probability = model.get_layer("logit"), model.get_layer("probability")
    assert isinstance(logit, keras.layers.Dense) and logit.dtype_policy.compute_dtype == "float32"
    assert logit.activation is keras.activations.linear
    assert probability.activation is keras.activations.sigmoid
    assert tuple(model.get_layer("last_conv").output.shape) == (None, 6, 6, 256)
    assert "resize" not in [layer.name for layer in model.layers]


def test_probability_is_the_sigmoid_of_the_logit_over_a_unit_temperature() -> None:
    """logit -> Rescaling(1, "temperature") -> sigmoid; the temperature is set on selection."""
    model = models.build_model("baseline", 32, 32)
    temperature = model.get_layer("temperature")
    assert isinstance(temperature, keras.layers.Rescaling)
    assert (temperature.scale, temperature.offset) == (1.0, 0.0)
    assert temperature.dtype_policy.compute_dtype == "float32"
    assert [layer.name for layer in model.layers][-3:] == ["logit", "temperature", "probability"]


def test_vgg16_takes_three_planes_as_its_bgr_channels() -> None:
    """3 channels: no grey-to-RGB copy; the planes z-D, z, z+D lose the B, G, R means."""
    model = models.build_model("vgg16", 32, 32, channels=3)
    names = [layer.name for layer in model.layers]
    assert tuple(model.input.shape) == (None, 32, 32, 3) and model.input.dtype == "uint8"
    assert "to_rgb" not in names and "vgg16" in names
    normalization = model.get_layer("imagenet_normalization")
    planes = np.array([[[[10, 20, 30]]]], dtype=np.float32)
    assert np.allclose(normalization(planes), planes - np.array(models.IMAGENET_BGR_MEAN))
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert model.predict(images, verbose=0).shape == (2, 1)
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 2"):
        models.build_model("baseline", 32, 32, channels=2)


def test_baseline_outputs_probabilities_for_uint8_images() -> None:
    """Predictions are (N, 1) in [0, 1] for uint8 input."""
    model = models.build_model("baseline", 32, 32)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (3, 1)
    assert np.all((probabilities >= 0) & (probabilities <= 1))


def test_smaller_train_size_resizes_inside_the_model(vgg16_model: keras.Model) -> None:
    """A 40 px input trained at 32 px holds a Resizing layer; the input stays 40 px uint8."""
    assert isinstance(vgg16_model.get_layer("resize"), keras.layers.Resizing)
    assert tuple(vgg16_model.input.shape) == (None, 40, 40, 1)
    assert vgg16_model.input.dtype == "uint8"


def test_transfer_backbone_is_nested_under_its_name(
    vgg16_model: keras.Model, resnet50_model: keras.Model
) -> None:
    """The backbones are single layers "vgg16" / "resnet50" keeping their inner layer names."""
    assert vgg16_model.get_layer("vgg16").get_layer("block5_conv3") is not None
    assert resnet50_model.get_layer("resnet50").get_layer("conv5_block3_out") is not None
    assert models.grad_cam_layer(vgg16_model) == "vgg16/block5_conv3"
    assert models.grad_cam_layer(models.build_model("baseline", 32, 32)) == "last_conv"


def test_frozen_transfer_model_trains_only_the_logit(resnet50_model: keras.Model) -> None:
    """With the backbone frozen, the logit's kernel and bias are the only trainable weights."""
    models.freeze_backbone(resnet50_model)
    names = sorted(weight.path for weight in resnet50_model.trainable_weights)
    assert names == ["logit/bias", "logit/kernel"]


def test_fine_tuning_unfreezes_top_layers_but_not_batchnorm(resnet50_model: keras.Model) -> None:
    """The top 10 ResNet50 layers are conv5_block3; its three convs train, its BatchNorms do not."""
    unfrozen = models.unfreeze_top_layers(resnet50_model, 10)
    backbone = resnet50_model.get_layer("resnet50")
    expected = ["conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv"]
    assert unfrozen == expected
    assert _trainable_layer_names(backbone) == expected
    models.freeze_backbone(resnet50_model)
    assert _trainable_layer_names(backbone) == []


def test_vgg16_fine_tuning_of_four_layers_is_block5(vgg16_model: keras.Model) -> None:
    """The top 4 VGG16 layers are block5's three convolutions and its pooling."""
    assert models.unfreeze_top_layers(vgg16_model, 4) == [
        "block5_conv1",
        "block5_conv2",
        "block5_conv3",
    ]
    models.freeze_backbone(vgg16_model)


def test_split_below_top_layers_reproduces_the_model(resnet50_model: keras.Model) -> None:
    """lower -> upper equals the whole model; a cut inside a residual block is refused."""
    lower, upper = models.split_below_top_layers(resnet50_model, 10)
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    whole = keras.ops.convert_to_numpy(resnet50_model(images, training=False))
    parts = keras.ops.convert_to_numpy(upper(lower(images, training=False), training=False))
    assert tuple(lower.output.shape) == (None, 1, 1, 2048)
    assert np.allclose(parts, whole, atol=1e-6)
    assert models.split_below_top_layers(resnet50_model, 5) is None


def test_unknown_model_name_is_refused() -> None:
    """build_model names the allowed models."""
    with pytest.raises(ValueError, match="model name must be one of"):
        models.build_model("inception", 32, 32)


def test_weights_option_forms() -> None:
    """auto/none apply to both backbones; a folder and per-model paths are recognised."""
    assert models.parse_weights_option("none") == {"vgg16": "none", "resnet50": "none"}
    assert models.parse_weights_option("/w") == {"vgg16": "dir:/w", "resnet50": "dir:/w"}
    assert models.parse_weights_option("vgg16=/a.h5") == {"vgg16": "file:/a.h5", "resnet50": "auto"}
    with pytest.raises(UserError, match="is not NAME=PATH"):
        models.parse_weights_option("alexnet=/a.h5")


@pytest.fixture
def offline_keras_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Keras cache and no network."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(models, "_imagenet_reachable", lambda url: False)
    return tmp_path / "keras_home" / "models"


def test_auto_weights_fall_back_to_random_naming_the_cache_file(
    offline_keras_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without cache or network, auto warns with the file to place and uses random weights."""
    with caplog.at_level(logging.WARNING):
        resolved = models.resolve_weights("resnet50", "auto")
    assert resolved.argument is None
    assert resolved.source.startswith("random: ImageNet weights unavailable")
    assert (
        f"place resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in {offline_keras_cache}"
        in caplog.text
    )


def test_imagenet_weights_are_strict(offline_keras_cache: Path) -> None:
    """--weights imagenet is an error, not a fallback, when the weights are unreachable."""
    with pytest.raises(UserError, match="place vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        models.resolve_weights("vgg16", "imagenet")


def test_cached_imagenet_file_is_used(offline_keras_cache: Path) -> None:
    """A weight file in the Keras cache is recorded as ImageNet from that path."""
    offline_keras_cache.mkdir(parents=True)
    cached = offline_keras_cache / models.BACKBONES["vgg16"].cache_file
    cached.write_bytes(b"")
    resolved = models.resolve_weights("vgg16", "auto")
    assert resolved.argument == "imagenet"
    assert resolved.source == f"imagenet: {cached}"


def test_weights_folder_written_by_the_test_is_loaded(tmp_path: Path) -> None:
    """A folder holding vgg16's cache file name loads those weights into the nested backbone."""
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    source.save(tmp_path / models.BACKBONES["vgg16"].cache_file)
    resolved = models.resolve_weights("vgg16", f"dir:{tmp_path}")
    model = models.build_model("vgg16", 32, 32, resolved)
    loaded = model.get_layer("vgg16").get_layer("block5_conv3").kernel
    expected = source.get_layer("block5_conv3").kernel
    assert resolved.source.startswith("file: ")
    assert np.array_equal(keras.ops.convert_to_numpy(loaded), keras.ops.convert_to_numpy(expected))


def test_weights_file_that_does_not_match_is_a_user_error(tmp_path: Path) -> None:
    """A weights file of another architecture is one clear sentence."""
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.h5"
    other.save(path)
    resolved = models.resolve_weights("vgg16", f"file:{path}")
    with pytest.raises(UserError, match=f"weights file {path} does not match the vgg16 backbone"):
        models.build_model("vgg16", 32, 32, resolved)


def test_missing_weights_file_is_a_user_error(tmp_path: Path) -> None:
    """A folder without the expected cache file name is refused, naming the file."""
    with pytest.raises(
        UserError,
        match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 for resnet50 does not exist",
    ):
        models.resolve_weights("resnet50", f"dir:{tmp_path}")


def test_logit_and_feature_grads_match_the_analytic_gradient() -> None:
    """Through GAP -> Dense, d logit / dA = kernel / (h w) everywhere, for every image."""
    model = models.build_model("baseline", 32, 32)
    target = model.get_layer("last_conv").output
    feature_model = keras.Model(model.input, target)
    head_model = keras.Model(target, model.get_layer("logit").output)
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    grads_of = backend.make_logit_and_feature_grads(feature_model, head_model)
    logits, features, grads = grads_of(images)
    kernel = keras.ops.convert_to_numpy(model.get_layer("logit").kernel)[:, 0]
    expected = np.broadcast_to(kernel / (4 * 4), grads.shape)
    probabilities = model.predict(images, verbose=0)[:, 0]
    assert features.shape == grads.shape == (3, 4, 4, 256)
    assert np.allclose(grads, expected, rtol=1e-5, atol=1e-8)
    assert np.allclose(1 / (1 + np.exp(-logits)), probabilities, atol=1e-6)


def test_out_of_memory_errors_are_recognised() -> None:
    """XLA and TensorFlow allocation failures count as out of memory; others do not."""
    assert backend.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert backend.is_out_of_memory(MemoryError())
    assert not backend.is_out_of_memory(ValueError("shapes differ"))
