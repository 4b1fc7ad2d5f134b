"""Tests of lungct.gradcam and lungct.interpret.cam_checks (TF in-process, JAX in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from interpret_fixtures import (
    ensemble_model,
    gap_model,
    make_baseline_model,
    resnet_like_model,
    vgg_like_model,
)

from lungct.gradcam import (
    GradCam,
    convolutional_layer_names,
    probability_of_logits,
    resolve_target_layer,
)
from lungct.interpret.cam_checks import (
    dilation_radius_px,
    energy_in_masks,
    pointing_game,
    randomised_weights,
    rank_correlations,
    top_block_layers,
)
from lungct.modelio import ensemble_members

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def grad_cam(model, images, layer_name=None, target="positive", method="gradcam"):
    """Maps of ``images`` through a fresh :class:`GradCam` (one-off use, as the tests need)."""
    return GradCam(model, layer_name, method).explain(images, target).maps


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Six random uint8 images (N, 32, 32, 1)."""
    return np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 1)).astype(np.uint8)


def reference_cam(features: np.ndarray, weights: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """ReLU(sign * sum_k w_k A^k), upsampled by keras.ops.image.resize, divided by the max."""
    cam = np.maximum(sign * features @ weights, 0)[..., None]
    maps = keras.ops.convert_to_numpy(keras.ops.image.resize(cam, (SIZE, SIZE)))[..., 0]
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0)


def gap_features(model: keras.Model, images: np.ndarray) -> np.ndarray:
    layer = model.get_layer("last_conv")
    return keras.ops.convert_to_numpy(keras.Model(model.input, layer.output)(images))


def test_gradcam_equals_relu_cam_for_gap_dense(images):
    """For GAP -> Dense, Grad-CAM is ReLU(CAM) up to scale (Selvaraju et al. 2017, sec. 3.1)."""
    model = gap_model()
    weights = model.get_layer("logit").get_weights()[0][:, 0]
    expected = reference_cam(gap_features(model, images), weights)
    np.testing.assert_allclose(grad_cam(model, images), expected, atol=1e-5)


def test_negative_target_flips_the_sign(images):
    """target='negative' explains -logit: ReLU(-CAM)."""
    model = gap_model()
    weights = model.get_layer("logit").get_weights()[0][:, 0]
    expected = reference_cam(gap_features(model, images), weights, sign=-1.0)
    np.testing.assert_allclose(grad_cam(model, images, target="negative"), expected, atol=1e-5)


def test_map_unchanged_when_logit_is_scaled(images):
    """Multiplying the logit by a positive constant leaves the map unchanged."""
    np.testing.assert_allclose(grad_cam(gap_model(logit_scale=7.0), images),
                               grad_cam(gap_model(), images), atol=1e-5)


def test_map_is_zero_not_nan_when_nothing_is_positive(images):
    """Non-negative features and negative weights give an all-zero map, never NaN."""
    model = gap_model()
    kernel, bias = model.get_layer("logit").get_weights()
    model.get_layer("logit").set_weights([-np.abs(kernel) - 0.1, bias])
    maps = grad_cam(model, images)
    assert maps.dtype == np.float32 and maps.shape == (6, SIZE, SIZE)
    assert not np.isnan(maps).any() and maps.max() == 0.0


def test_gradcam_plus_plus_follows_eq_19(images):
    """Grad-CAM++ weights for GAP -> Dense match eq. 19 computed by hand."""
    model = gap_model()
    weights = model.get_layer("logit").get_weights()[0][:, 0]
    features = gap_features(model, images)
    cells = features.shape[1] * features.shape[2]
    gradient = weights / cells
    alpha = gradient ** 2 / (2 * gradient ** 2 + features.sum(axis=(1, 2)) * gradient ** 3)
    channel = (alpha * np.maximum(gradient, 0)) * cells
    expected = np.stack([reference_cam(features[i:i + 1], channel[i])[0] for i in range(6)])
    np.testing.assert_allclose(grad_cam(model, images, method="gradcam++"), expected,
                               atol=1e-5)


def test_batches_give_the_same_maps(images):
    """Maps do not depend on the batch size."""
    cam = GradCam(make_baseline_model(SIZE))
    np.testing.assert_allclose(cam.explain(images, batch_size=4).maps,
                               cam.explain(images, batch_size=6).maps, atol=1e-6)


def test_default_layer_of_baseline_is_last_conv():
    """The baseline's default is its last conv block output, ``last_conv``."""
    assert resolve_target_layer(make_baseline_model(SIZE), None).name == "last_conv"


def test_nested_vgg_default_layer_matches_flat_model(images):
    """Inside a nested backbone the default is the last conv before pooling
    (``block5_conv3`` in VGG16), and its maps equal those of the flattened model."""
    nested = vgg_like_model()
    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Concatenate()([x, x, x])
    copies = [(layer, layer.__class__.from_config(layer.get_config()))
              for layer in [*nested.get_layer("vgg16").layers[1:],
                            *(nested.get_layer(n) for n in ("gap", "dropout", "logit"))]]
    for _, copy in copies:
        x = copy(x)
    flat = keras.Model(inputs, x)
    for original, copy in copies:
        copy.set_weights(original.get_weights())
    cam = GradCam(nested)
    assert cam.layer_name == "vgg16/block2_conv2"
    np.testing.assert_allclose(cam.explain(images).maps,
                               grad_cam(flat, images, layer_name="block2_conv2"), atol=1e-5)


def test_nested_resnet_after_add_survives_save_and_load(images, tmp_path):
    """ResNet-like: the default is the post-add block output, equal to ReLU(CAM) of the
    backbone output, also after saving and loading in safe mode."""
    model = resnet_like_model()
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    cam = GradCam(loaded)
    assert cam.layer_name == "resnet50/conv5_block3_out"
    rgb = np.repeat(images.astype(np.float32) / 255.0, 3, axis=-1)
    features = keras.ops.convert_to_numpy(loaded.get_layer("resnet50")(rgb))
    weights = loaded.get_layer("logit").get_weights()[0][:, 0]
    np.testing.assert_allclose(cam.explain(images).maps, reference_cam(features, weights),
                               atol=1e-5)


def test_unknown_layer_lists_convolutional_layers():
    """A name that does not exist is an error listing the model's conv layers."""
    with pytest.raises(ValueError, match=r"are: vgg16/block1_conv1, vgg16/block2_conv1"):
        grad_cam(vgg_like_model(), np.zeros((1, SIZE, SIZE, 1), np.uint8), layer_name="nope")


def test_layer_bypassed_by_a_skip_connection_is_rejected():
    """A layer inside a residual block is not a cut of the graph: a clear error."""
    with pytest.raises(ValueError, match="cannot split the model"):
        GradCam(resnet_like_model(), layer_name="resnet50/conv5_block3_1_conv")


def test_non_feature_map_layer_is_rejected():
    """A layer whose output is not 4-D cannot be explained."""
    with pytest.raises(ValueError, match="Grad-CAM needs a 4-D"):
        GradCam(make_baseline_model(SIZE), layer_name="gap")


def test_wrong_image_dtype_is_rejected():
    """Float images are rejected: the saved model takes uint8."""
    with pytest.raises(ValueError, match="images must be uint8"):
        grad_cam(gap_model(), np.zeros((1, SIZE, SIZE, 1), np.float32))


JAX_SCRIPT = textwrap.dedent("""
    import numpy as np, keras
    from interpret_fixtures import resnet_like_model
    from lungct.gradcam import GradCam
    assert keras.backend.backend() == "jax"
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)
    model = resnet_like_model(seed=None)
    cam = GradCam(model)
    assert cam.layer_name == "resnet50/conv5_block3_out"
    rgb = np.repeat(images.astype(np.float32) / 255.0, 3, axis=-1)
    features = np.asarray(model.get_layer("resnet50")(rgb))
    weights = model.get_layer("logit").get_weights()[0][:, 0]
    for sign, target in ((1, "positive"), (-1, "negative")):
        relu_cam = np.maximum(sign * features @ weights, 0)[..., None]
        ref = np.asarray(keras.ops.image.resize(relu_cam, (32, 32)))[..., 0]
        peak = ref.max(axis=(1, 2), keepdims=True)
        ref = np.where(peak > 0, ref / np.where(peak > 0, peak, 1), 0)
        assert np.abs(cam.explain(images, target).maps - ref).max() < 1e-5, target
    print("jax-ok")
""")


def test_gradcam_on_jax_backend(tmp_path):
    """On JAX, Grad-CAM at a nested backbone's output equals ReLU(+-CAM) for both targets."""
    script = tmp_path / "jax_check.py"
    script.write_text(JAX_SCRIPT, encoding="utf-8")
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert "jax-ok" in done.stdout, done.stderr[-2000:]


def planted_map(row: int, col: int) -> np.ndarray:
    cam = np.zeros((1, 64, 64), np.float32)
    cam[0, row, col] = 1.0
    return cam


def square_mask() -> np.ndarray:
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 20:30, 20:30] = True
    return mask


def test_pointing_game_hits_planted_spot():
    """A peak inside the mask, or within the 2-px tolerance, is a hit; far away a miss."""
    assert dilation_radius_px(64) == 2
    assert pointing_game(planted_map(25, 25), square_mask())[0][0]
    assert pointing_game(planted_map(31, 25), square_mask())[0][0]
    assert not pointing_game(planted_map(40, 25), square_mask())[0][0]


def test_pointing_game_chance_and_zero_map():
    """Chance rate is the dilated mask's area share; an all-zero map is a miss."""
    hits, chance = pointing_game(np.zeros((1, 64, 64), np.float32), square_mask())
    assert not hits[0]
    assert 100 / 4096 < chance[0] < 14 * 14 / 4096


def test_pointing_game_uses_plateau_centroid():
    """A flat maximum points at its centroid."""
    cam = np.zeros((1, 64, 64), np.float32)
    cam[0, 22:28, 22:40] = 1.0
    assert pointing_game(cam, square_mask())[0][0]


def test_energy_of_uniform_map_equals_mask_area():
    """A uniform map has as much energy inside the mask as the mask's area share."""
    share, area = energy_in_masks(np.ones((1, 64, 64), np.float32), square_mask())
    assert share[0] == pytest.approx(area[0]) and area[0] == pytest.approx(100 / 4096)


def test_rank_correlation_bounds():
    """Identical maps correlate at 1, reversed maps at -1, a constant map is NaN."""
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    assert rank_correlations(ramp, ramp)[0] == pytest.approx(1.0)
    assert rank_correlations(ramp, 1 - ramp)[0] == pytest.approx(-1.0)
    assert np.isnan(rank_correlations(ramp, np.zeros_like(ramp))[0])


def test_randomisation_reinitialises_top_block_and_restores(images):
    """The head and top block are redrawn inside the context and restored after it."""
    model = make_baseline_model(SIZE)
    cam = GradCam(model)
    chosen = top_block_layers(model, cam.target)
    assert [layer.name for layer in chosen] == ["block4_conv", "block4_bn", "logit"]
    before = cam.explain(images).maps
    kernel = model.get_layer("block4_conv").get_weights()[0].copy()
    with randomised_weights(chosen, seed=0):
        assert not np.allclose(model.get_layer("block4_conv").get_weights()[0], kernel)
        changed = cam.explain(images).maps
    np.testing.assert_array_equal(model.get_layer("block4_conv").get_weights()[0], kernel)
    np.testing.assert_allclose(cam.explain(images).maps, before, atol=1e-6)
    assert not np.allclose(changed, before)


def test_gradcam_maps_are_resized_like_opencv(images):
    """Upsampling is half-pixel-centred bilinear, as OpenCV INTER_LINEAR."""
    model = gap_model()
    weights = model.get_layer("logit").get_weights()[0][:, 0]
    cams = np.maximum(gap_features(model, images) @ weights, 0)
    resized = np.stack([cv2.resize(c, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
                        for c in cams])
    np.testing.assert_allclose(
        grad_cam(model, images) * resized.max(axis=(1, 2), keepdims=True), resized, atol=1e-5)


def test_ensemble_map_is_the_mean_of_member_maps(images, tmp_path):
    """After a safe-mode save and load, the ensemble's map is the mean of each member's map
    at its own last_conv with its own logit, and its logit the members' mean."""
    ensemble_model(SIZE).save(tmp_path / "ensemble.keras")
    model = keras.models.load_model(tmp_path / "ensemble.keras", compile=False, safe_mode=True)
    cam = GradCam(model)
    assert cam.layer_name == "fold0/last_conv, fold1/last_conv"
    assert cam.target is None and cam.feature_hw == (16, 16)
    result = cam.explain(images)
    assert [m.model.name for m in cam.members] == ["fold0", "fold1"]
    members = [GradCam(m).explain(images) for m in ensemble_members(model)]
    np.testing.assert_allclose(result.maps, (members[0].maps + members[1].maps) / 2, atol=1e-6)
    np.testing.assert_allclose(result.member_maps[1], members[1].maps, atol=1e-6)
    mean_logit = keras.Model(model.input, model.get_layer("mean_logit").output)
    np.testing.assert_allclose(result.logits, mean_logit.predict(images, verbose=0)[:, 0],
                               atol=1e-5)
    assert not np.allclose(members[0].maps, members[1].maps)


def test_ensemble_of_three_channel_members_takes_rgb_images():
    """Members of a 3-channel ensemble take uint8 (N, S, S, 3); one channel is refused."""
    cam = GradCam(ensemble_model(SIZE, channels=3))
    rgb = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    assert cam.explain(rgb).maps.shape == (2, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"images must be uint8 of shape \(N, \*\(32, 32, 3\)\)"):
        cam.explain(rgb[..., :1])


def test_ensemble_layer_is_resolved_per_member():
    """A layer name given for an ensemble is looked up in every member; the ensemble itself
    has no single target layer."""
    model = ensemble_model(SIZE)
    assert GradCam(model, "block1_conv").layer_name == "fold0/block1_conv, fold1/block1_conv"
    with pytest.raises(ValueError, match="'ensemble' is a fold ensemble"):
        resolve_target_layer(model, None)
    assert "fold1/block2_conv" in convolutional_layer_names(model)


def test_probabilities_apply_the_temperature(images):
    """probability_of_logits reproduces the saved model's output: sigmoid(logit / T)."""
    model = ensemble_model(SIZE, temperature=2.5)
    logits = GradCam(model).explain(images).logits
    np.testing.assert_allclose(probability_of_logits(model, logits),
                               model.predict(images, verbose=0)[:, 0], atol=1e-5)
    plain = make_baseline_model(SIZE)
    np.testing.assert_allclose(probability_of_logits(plain, np.array([0.0, np.log(3.0)])),
                               [0.5, 0.75])


def test_ensemble_of_nested_backbones_survives_save_and_load(images, tmp_path):
    """Members that nest a VGG-like backbone are explained at fold<k>/vgg16/block2_conv2,
    after a safe-mode save and load, and each member's top block is found inside its
    backbone."""
    members = []
    for k in range(2):
        classifier = vgg_like_model(seed=k)
        members.append(keras.Model(classifier.input, classifier.get_layer("logit").output,
                                   name=f"fold{k}"))
    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8", name="image")
    mean_logit = keras.layers.Average(name="mean_logit")([m(inputs) for m in members])
    keras.Model(inputs, keras.layers.Activation("sigmoid", name="probability")(mean_logit)
                ).save(tmp_path / "ensemble.keras")
    model = keras.models.load_model(tmp_path / "ensemble.keras", compile=False, safe_mode=True)
    cam = GradCam(model)
    assert cam.layer_name == "fold0/vgg16/block2_conv2, fold1/vgg16/block2_conv2"
    assert cam.explain(images).maps.shape == (len(images), SIZE, SIZE)
    chosen = top_block_layers(cam.members[1].model, cam.members[1].target)
    assert [layer.name for layer in chosen] == ["block2_conv2", "logit"]
