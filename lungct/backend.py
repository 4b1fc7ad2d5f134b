"""The one module that knows whether Keras runs on TensorFlow or JAX.

Everything else in lungct uses ``keras`` and ``keras.ops`` only; what cannot be written that
way lives here: device listing, bf16 support, the jit setting, out-of-memory detection and the
gradient of a logit with respect to an intermediate feature map (Grad-CAM, Selvaraju et al.
2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization").
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import keras
import numpy as np

from lungct.environment import package_versions

__all__ = [
    "accelerator_kind",
    "backend_name",
    "backend_version",
    "environment",
    "is_out_of_memory",
    "list_devices",
    "make_logit_and_feature_grads",
    "supports_bf16",
    "tensorboard_available",
    "training_jit_compile",
]

LOG = logging.getLogger(__name__)

#: Compute capability from which NVIDIA GPUs run bfloat16 natively (Ampere, 8.0).
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)

GradFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def backend_name() -> str:
    """Return the Keras backend in use: ``"tensorflow"`` or ``"jax"``."""
    name = keras.backend.backend()
    if name not in ("tensorflow", "jax"):
        raise ValueError(f"lungct supports the tensorflow and jax backends, got {name!r}")
    return name


def backend_version() -> str:
    """Return the version of the backend library (TensorFlow or JAX)."""
    if backend_name() == "jax":
        import jax

        return jax.__version__
    import tensorflow as tf

    return tf.__version__


def list_devices() -> list[str]:
    """Return the devices the backend computes on, e.g. ``["cpu:0"]`` or ``["gpu:0 (H100)"]``.

    Accelerators are listed when there are any, the CPU otherwise (the device Keras uses).
    """
    if backend_name() == "jax":
        import jax

        return [f"{device.platform}:{device.id} ({device.device_kind})" for device in jax.devices()]
    import tensorflow as tf

    logical = tf.config.list_logical_devices()
    accelerators = [device for device in logical if device.device_type != "CPU"]
    chosen = accelerators or logical
    return [f"{device.device_type.lower()}:{device.name.rsplit(':', 1)[-1]}" for device in chosen]


def accelerator_kind() -> str:
    """Return ``"gpu"``, ``"tpu"`` or ``"cpu"``: the kind of the first device Keras uses."""
    return list_devices()[0].split(":", 1)[0]


def supports_bf16() -> bool:
    """Whether the accelerator runs bfloat16 natively (GPU compute capability >= 8.0, or a TPU)."""
    kind = accelerator_kind()
    if kind == "tpu":
        return True
    if kind != "gpu":
        return False
    if backend_name() == "jax":
        import jax

        capability = getattr(jax.devices()[0], "compute_capability", "0.0")
        major, minor = (int(part) for part in str(capability).split(".")[:2])
    else:
        import tensorflow as tf

        gpu = tf.config.list_physical_devices("GPU")[0]
        major, minor = tf.config.experimental.get_device_details(gpu).get(
            "compute_capability", (0, 0)
        )
    return (major, minor) >= BF16_MIN_COMPUTE_CAPABILITY


def training_jit_compile() -> bool:
    """The ``jit_compile`` value to compile training models with.

    JAX: True (XLA is how JAX runs; the augmentation of lungct.train.augment is jit-compatible).
    TensorFlow: False (XLA slowed CPU training here, docs/measured.md; the project's GPU
    path is JAX).
    """
    return backend_name() == "jax"


def tensorboard_available() -> bool:
    """Whether Keras' TensorBoard callback can log: on the TensorFlow backend only (it writes
    through ``tf.summary``; the JAX-only GPU install has no TensorFlow), with the
    ``tensorboard`` package installed (TensorFlow 2.21 no longer brings it; a warning says so).
    """
    if backend_name() != "tensorflow":
        return False
    if importlib.util.find_spec("tensorboard") is None:
        LOG.warning("no TensorBoard logs: the tensorboard package is not installed "
                    "(pip install tensorboard)")
        return False
    return True


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a backend allocation failure (TF OOM, XLA RESOURCE_EXHAUSTED)."""
    if isinstance(error, MemoryError):
        return True
    text = f"{type(error).__name__}: {error}"
    return any(
        marker in text
        for marker in (
            "ResourceExhausted",
            "RESOURCE_EXHAUSTED",
            "OOM when allocating",
            "Out of memory",
            "out of memory",
        )
    )


def environment() -> dict[str, object]:
    """Python, platform, lungct, Keras and NumPy versions, the backend and its devices."""
    return {
        **package_versions("keras", "numpy"),
        "backend": backend_name(),
        "backend_version": backend_version(),
        "devices": list_devices(),
        "dtype_policy": keras.config.dtype_policy().name,
    }


def make_logit_and_feature_grads(
    feature_model: keras.Model, head_model: keras.Model
) -> GradFunction:
    """Compile ``images -> (logits, features, d logit / d features)`` for repeated batches.

    ``feature_model`` maps the model's uint8 images to the target feature map ``A`` of shape
    ``(N, h, w, k)``; ``head_model`` maps ``A`` to the logit ``(N, 1)`` (the ``"logit"``
    layer, before the sigmoid; e.g. ``lungct.gradcam.split_model``). Both run in inference
    mode, so each image's logit depends on its own features only and the gradient of the
    batch's summed logits is the per-image gradient. The returned function is traced once
    per input shape (tf.function on TensorFlow, jax.jit on JAX), reads the variables at call
    time (changed weights need no recompiling) and returns float32 NumPy arrays ``(N,)``,
    ``(N, h, w, k)``, ``(N, h, w, k)``.
    """
    if backend_name() == "jax":
        return _jax_grad_function(feature_model, head_model)
    return _tensorflow_grad_function(feature_model, head_model)


def _as_numpy(*tensors) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float32) for t in tensors)


def _tensorflow_grad_function(feature_model: keras.Model, head_model: keras.Model) -> GradFunction:
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def compute(images):
        features = feature_model(images, training=False)
        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = tf.reshape(head_model(features, training=False), [-1])
            total = tf.reduce_sum(tf.cast(logits, tf.float32))
        return logits, features, tape.gradient(total, features)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _as_numpy(*compute(tf.convert_to_tensor(images)))

    return run


def _jax_grad_function(feature_model: keras.Model, head_model: keras.Model) -> GradFunction:
    import jax
    import jax.numpy as jnp

    def summed_logits(features, head_trainable, head_non_trainable):
        outputs, _ = head_model.stateless_call(
            head_trainable, head_non_trainable, features, training=False
        )
        logits = jnp.reshape(outputs, (-1,))
        return jnp.sum(logits.astype(jnp.float32)), logits

    grad_of_logits = jax.value_and_grad(summed_logits, has_aux=True)

    @jax.jit
    def compute(
        images, feature_trainable, feature_non_trainable, head_trainable, head_non_trainable
    ):
        features, _ = feature_model.stateless_call(
            feature_trainable, feature_non_trainable, images, training=False
        )
        (_, logits), grads = grad_of_logits(features, head_trainable, head_non_trainable)
        return logits, features, grads

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = [
            [variable.value for variable in variables]
            for variables in (
                feature_model.trainable_variables,
                feature_model.non_trainable_variables,
                head_model.trainable_variables,
                head_model.non_trainable_variables,
            )
        ]
        return _as_numpy(*compute(jnp.asarray(images), *values))

    return run
