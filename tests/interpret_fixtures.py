"""Fabricated stage-2 outputs for the interpretation tests (no training stage needed).

``make_dataset`` writes an output_dataset/ folder as prepare would (PNG images, ROI masks,
manifest.csv, dataset.json; 1 channel, or 3 = planes at z-D, z, z+D); ``make_baseline_model``
builds a model that follows the model contract (uint8 input, ``last_conv``, ``logit``,
``temperature``, ``probability``); ``ensemble_model`` a fold ensemble of such members in
plain Keras; ``write_results`` scores the model on the dataset and writes
training_results.json as training would (with calibration and cross-validation blocks when
asked).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from lungct import contract
from lungct.fingerprint import file_set_sha256

__all__ = [
    "make_dataset", "make_baseline_model", "ensemble_model", "write_results", "fabricate_run",
    "gap_model", "vgg_like_model", "resnet_like_model", "SIDE_PLANE_SCALE",
]

#: The 3-channel fixture's planes at z-D and z+D are the centre plane times this factor, so an
#: overlay that shows the centre plane can be told from one that shows a side plane.
SIDE_PLANE_SCALE = 0.4

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _slice_image(rng: np.random.Generator, size: int, radius_px: int, brightness: int,
                 centre: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    image = np.clip(rng.normal(60, 12, (size, size)), 0, 255)
    mask = np.zeros((size, size), np.uint8)
    if centre is not None:
        cv2.circle(mask, centre, radius_px, 255, -1)
        image[mask > 0] = brightness + rng.normal(0, 8, int((mask > 0).sum()))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_dataset(root: Path, n_patients: int = 24, slices_per_patient: int = 4,
                 size: int = 32, seed: int = 0, source: str = "synthetic",
                 brightness: tuple[int, int] = (210, 140), channels: int = 1) -> Path:
    """Write a dataset folder; half the patients carry a cancer, half a benign nodule.

    Each patient contributes ``slices_per_patient`` slices through its nodule and one slice
    without findings. Cancers are larger than benign nodules and, by default, brighter
    (``brightness`` = cancer, benign grey level). With ``channels=3`` every image is RGB:
    R and B (planes z-D, z+D) are the centre plane G times ``SIDE_PLANE_SCALE``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "output_dataset"
    for sub in ("cancer", "non_cancer", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    order = rng.permutation(n_patients)
    for rank, p in enumerate(order):
        split = "train" if rank < 0.6 * n_patients else "val" if rank < 0.8 * n_patients else "test"
        cancer = p % 2 == 0
        diameter = float(rng.uniform(10, 24) if cancer else rng.uniform(3, 12))
        malignancy = float(rng.choice([4, 4.5, 5]) if cancer else rng.choice([1, 1.5, 2]))
        readers = int(rng.integers(1, 5))
        for s in range(slices_per_patient + 1):
            has_nodule = s < slices_per_patient
            label = int(cancer and has_nodule)
            centre = (int(rng.integers(8, size - 8)), int(rng.integers(8, size - 8)))
            radius = max(1, int(round(diameter / 2 * size / 64)))
            image, mask = _slice_image(rng, size, radius, brightness[0 if cancer else 1],
                                       centre if has_nodule else None)
            class_name = "cancer" if label else "non_cancer"
            name = f"P{p:03d}_s{s}.png"
            if channels == 3:
                side = np.round(image * SIDE_PLANE_SCALE).astype(np.uint8)
                image = np.stack([side, image, side], axis=-1)
            (folder / class_name / name).write_bytes(contract.encode_png(image))
            mask_path = ""
            if has_nodule:
                mask_path = f"masks/{name}"
                cv2.imwrite(str(folder / mask_path), mask)
            rows.append({
                "path": f"{class_name}/{name}", "label": label, "class_name": class_name,
                "split": split, "patient_id": f"P{p:03d}", "series_uid": f"1.2.{p}",
                "slice_z_mm": float(s * 2.5), "nodule_id": f"N{p}" if has_nodule else "",
                "malignancy": malignancy if has_nodule else "",
                "n_readers": readers if has_nodule else "",
                "diameter_mm": round(diameter, 2) if has_nodule else "",
                "negative_kind": "" if label else ("benign_nodule" if has_nodule
                                                   else "no_finding"),
                "mm_per_px": 0.7, "mask_path": mask_path, "source_file": f"raw/{p}/{s}.dcm",
            })
    contract.write_manifest(folder, rows)
    info = {"source": source, "label_rule": {"rating": "malignancy", "aggregate": "median",
                                             "cancer_at_least": 4, "non_cancer_at_most": 2},
            "view": "slice", "image_size": size, "seed": seed, "label_source": "lidc_xml",
            "channels": channels, "channel_order": list(contract.CHANNEL_ORDERS[channels]),
            "context_mm": 2.5 if channels == 3 else 0.0}
    contract.write_dataset_info(folder, info)
    return folder


def _calibrated_output(logit, temperature: float):
    """``logit`` -> Rescaling(1/T) ``temperature`` -> sigmoid ``probability``."""
    from keras import layers

    scaled = layers.Rescaling(1.0 / temperature, name="temperature", dtype="float32")(logit)
    return layers.Activation("sigmoid", name="probability", dtype="float32")(scaled)


def make_baseline_model(size: int = 32, filters: tuple[int, ...] = (8, 8, 16, 16),
                        seed: int = 0, channels: int = 1, temperature: float = 1.0):
    """A baseline CNN that follows the model contract (four conv blocks, ``last_conv``)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    images = keras.Input((size, size, channels), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(images)
    for block, count in enumerate(filters, start=1):
        x = layers.Conv2D(count, 3, padding="same", name=f"block{block}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        last = block == len(filters)
        x = layers.Activation("relu", name="last_conv" if last else f"block{block}_relu")(x)
        if not last:
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    logit = layers.Dense(1, name="logit", dtype="float32")(x)
    return keras.Model(images, _calibrated_output(logit, temperature), name="baseline")


def ensemble_model(size: int = 32, channels: int = 1, n_members: int = 2,
                   temperature: float = 1.0, seed: int = 0):
    """A fold ensemble as training saves one: ``image`` -> nested baseline-like members
    ``fold0`` .. (each truncated at its ``logit``) -> Average ``mean_logit`` ->
    ``temperature`` -> ``probability``."""
    import keras
    from keras import layers

    members = []
    for k in range(n_members):
        member = make_baseline_model(size, filters=(4, 8), seed=seed + k, channels=channels)
        members.append(keras.Model(member.input, member.get_layer("logit").output,
                                   name=f"fold{k}"))
    images = keras.Input((size, size, channels), dtype="uint8", name="image")
    mean_logit = layers.Average(name="mean_logit")([member(images) for member in members])
    return keras.Model(images, _calibrated_output(mean_logit, temperature), name="ensemble")


def _block(model, dataset: Path, manifest: pd.DataFrame, split: str, channels: int,
           temperature: float | None) -> dict:
    rows = manifest[manifest["split"] == split]
    images = np.stack([contract.read_png(dataset / p, channels=channels)
                       for p in rows["path"]]).reshape(len(rows), *model.input.shape[1:])
    probs = model.predict(images, verbose=0)[:, 0].astype(np.float64)
    block = {"paths": rows["path"].tolist(), "patient_ids": rows["patient_id"].tolist(),
             "y_true": rows["label"].astype(int).tolist(), "y_prob": probs.tolist()}
    if temperature is not None:
        clipped = np.clip(probs, 1e-12, 1 - 1e-12)
        logits = np.log(clipped / (1 - clipped)) * temperature
        block[contract.UNCALIBRATED_KEY] = (1 / (1 + np.exp(-logits))).tolist()
    return block


def _cross_validation(manifest: pd.DataFrame, n_folds: int) -> dict:
    """A cross_validation block as training writes it (fold AUCs made up per fold)."""
    patients = sorted(set(manifest.loc[manifest["split"] != "test", "patient_id"]))
    fold_auc = [round(0.6 + 0.05 * k, 3) for k in range(n_folds)]
    entry = {"fold_val_auc": fold_auc, "mean": float(np.mean(fold_auc)),
             "std": float(np.std(fold_auc, ddof=1)), "oof_val_auc": 0.66}
    return {"folds": n_folds, "stratified_by": "patient label",
            "fold_of_patient": {p: i % n_folds for i, p in enumerate(patients)},
            "models": {"baseline": entry,
                       "vgg16": {**entry, "fold_val_auc": [0.5] * n_folds, "mean": 0.5,
                                 "std": 0.0, "oof_val_auc": 0.5}},
            "selected": "baseline"}


def write_results(root: Path, dataset: Path, model, preset: str = "full",
                  threshold: float | None = None, seed: int = 0,
                  temperature: float | None = None, folds: int = 1) -> Path:
    """Save ``model`` as the selected ``baseline`` and write training_results.json.

    A second entry, ``vgg16``, carries noisier predictions of the same images (no file), so
    the model comparison has two models. With ``temperature`` (the T inside ``model``) the
    results carry ``calibration`` and ``y_prob_uncalibrated``; with ``folds`` > 1
    ``config.folds`` and ``cross_validation``.
    """
    manifest = contract.read_manifest(dataset)
    channels = contract.dataset_channels(contract.read_dataset_info(dataset))
    model_path = root / "runs" / "baseline" / "model.keras"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    validation = _block(model, dataset, manifest, "val", channels, temperature)
    test = _block(model, dataset, manifest, "test", channels, temperature)
    rng = np.random.default_rng(seed)
    noisy = {split: {**block, "y_prob": np.clip(np.asarray(block["y_prob"])
                                                + rng.normal(0, 0.2, len(block["y_prob"])),
                                                0, 1).tolist()}
             for split, block in (("validation", validation), ("test", test))}
    if threshold is None:
        threshold = float(np.median(validation["y_prob"]))
    entry = {"history": {}, "val_auc": 0.8, "params": model.count_params(),
             "weights_source": "random init", "train_seconds": 1.0, "images_per_second": 10.0}
    results = {
        "class_names": ["non_cancer", "cancer"], "best_model": "baseline",
        "threshold": {"value": threshold, "rule": "youden_j_on_validation"},
        "models": {
            "baseline": {**entry, "model_path": "runs/baseline/model.keras",
                         "validation": validation, "test": test},
            "vgg16": {**entry, "val_auc": 0.7, "weights_source": "imagenet",
                      "model_path": "runs/vgg16/model.keras", **noisy},
        },
        "validation": validation, "test": test,
        "config": {"dataset_dir": str(dataset), "image_size": model.input.shape[1],
                   "preset": preset, "seed": seed, "folds": folds, "epochs": 3,
                   "batch_size": 16, "learning_rate": 0.001, "augment": True,
                   "models": ["baseline", "vgg16"],
                   "gradcam_max_images": 64 if preset == "quick" else 0},
        "environment": {"python": "3.11"}, "dataset": {"source": "synthetic"},
        "model_files": {"h5": "lung_cancer_cnn_enhanced.h5",
                        "keras": "lung_cancer_cnn_enhanced.keras"},
    }
    if temperature is not None:
        results["calibration"] = {
            "method": "temperature scaling", "temperature": temperature,
            "fitted_on": "validation", "val_log_loss_before": 0.7, "val_log_loss_after": 0.6,
            "n": len(validation["y_true"])}
    if folds > 1:
        results["cross_validation"] = _cross_validation(manifest, folds)
    results["files_sha256"] = file_set_sha256(root, ["runs/baseline/model.keras"])
    return contract.write_training_results(root, results)


def fabricate_run(root: Path, size: int = 32, preset: str = "full") -> Path:
    """Dataset, untrained contract model and training_results.json under ``root``."""
    dataset = make_dataset(root, size=size)
    return write_results(root, dataset, make_baseline_model(size), preset=preset)


def _seed(seed: int | None) -> None:
    """Seed Keras (None leaves it unseeded: set_random_seed imports TensorFlow when it is
    installed, which costs seconds in the JAX subprocess)."""
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)


def gap_model(size: int = 32, filters: int = 4, seed: int | None = 0,
              logit_scale: float = 1.0):
    """Conv (``last_conv``) -> GAP -> Dense: Grad-CAM equals ReLU(CAM) up to scale.

    ``logit_scale`` multiplies the Dense kernel and bias, i.e. the logit.
    """
    import keras
    from keras import layers

    _seed(seed)
    images = keras.Input((size, size, 1), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255.0)(images)
    x = layers.Conv2D(filters, 3, strides=4, padding="same", activation="relu",
                      name="last_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    logit = layers.Dense(1, name="logit")(x)
    model = keras.Model(images, layers.Activation("sigmoid", name="probability")(logit))
    kernel, bias = model.get_layer("logit").get_weights()
    model.get_layer("logit").set_weights([kernel * logit_scale, bias * logit_scale + 0.1])
    return model


def _wrap_backbone(backbone, size: int):
    """Contract wrapper: uint8 -> rescale -> 3 channels -> nested backbone -> GAP -> logit."""
    import keras
    from keras import layers

    images = keras.Input((size, size, 1), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255.0)(images)
    x = layers.Concatenate(name="to_rgb")([x, x, x])
    x = backbone(x, training=False)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    logit = layers.Dense(1, name="logit", dtype="float32")(x)
    probability = layers.Activation("sigmoid", name="probability", dtype="float32")(logit)
    return keras.Model(images, probability)


def vgg_like_model(size: int = 32, seed: int | None = 0):
    """A tiny stand-in for VGG16 nested as layer ``vgg16`` (ends with a pooling layer)."""
    import keras
    from keras import layers

    _seed(seed)
    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="block1_conv1")(inputs)
    x = layers.MaxPooling2D(name="block1_pool")(x)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="block2_conv1")(x)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="block2_conv2")(x)
    x = layers.MaxPooling2D(name="block2_pool")(x)
    return _wrap_backbone(keras.Model(inputs, x, name="vgg16"), size)


def resnet_like_model(size: int = 32, seed: int | None = 0):
    """A tiny stand-in for ResNet50 nested as ``resnet50``, ending with a residual block
    whose output after the add is ``conv5_block3_out``."""
    import keras
    from keras import layers

    _seed(seed)
    inputs = keras.Input((size, size, 3))
    stem = layers.Conv2D(6, 3, strides=4, padding="same", activation="relu",
                         name="conv1_conv")(inputs)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv5_block3_1_conv")(stem)
    x = layers.Conv2D(6, 3, padding="same", name="conv5_block3_3_conv")(x)
    x = layers.BatchNormalization(name="conv5_block3_3_bn")(x)
    x = layers.Add(name="conv5_block3_add")([stem, x])
    x = layers.Activation("relu", name="conv5_block3_out")(x)
    return _wrap_backbone(keras.Model(inputs, x, name="resnet50"), size)
