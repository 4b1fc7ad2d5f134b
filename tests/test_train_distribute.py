"""Tests for lungct.train.distribute on 2 CPU devices, for the JAX backend, and for the
multi-process settings of lungct.train.job (the 2-process runs themselves:
tests/test_train_multiprocess.py).

Keras picks its backend at import and XLA its device count at start-up, so the JAX checks
(data-parallel, the compiled training step, augmentation, gradients) share one fresh Python
process, and the mirrored check runs in another.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lungct.errors import UserError
from lungct.train import batches
from lungct.train.batches import ArrayBatches
from lungct.train.distribute import FiniteLossCheck, data_shard, distribution_scope
from lungct.train.job import MULTI_PROCESS_VARIABLES, is_primary, join_processes, process_count

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, backend: str, extra_env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with KERAS_BACKEND=``backend``; parse its last line."""
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# One SGD step on a fixed batch, with a model without BatchNorm or Dropout: the replicas'
# gradients must add up to the single-device gradient, so the weights must agree.
ONE_STEP = """
    import json
    import keras
    import numpy as np
    from lungct.train.distribute import distribution_scope

    def build():
        keras.utils.set_random_seed(0)
        image = keras.Input((8, 8, 1), dtype="uint8")
        x = keras.layers.Rescaling(1 / 255)(image)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(image, keras.layers.Dense(1, activation="sigmoid")(x))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
        return model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
    y = rng.integers(0, 2, (8, 1)).astype(np.float32)
    single = build()
    initial = single.get_weights()
    single.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    with distribution_scope(MODE, 8):
        multi = build()
        multi.set_weights(initial)
        multi.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    pairs = list(zip(single.get_weights(), multi.get_weights()))
    data_parallel = {
        "devices": keras.distribution.list_devices() if MODE == "data-parallel" else DEVICES,
        "max_difference": max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6)))
                              for a, b in pairs),
        "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(initial, single.get_weights())),
    }
"""


JAX_CHECKS = """
    import json
    import keras
    import numpy as np
    from lungct import backend
    from lungct.train import models
    from lungct.train.augment import AugmentationRanges, DeviceAugmentation, augmented_model
    from lungct.train.batches import ArrayBatches
    from lungct.errors import UserError
    from lungct.train.loop import compile_for_training

    try:
        with distribution_scope("data-parallel", 7):
            pass
    except UserError as error:
        uneven_message = str(error)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    classifier = models.build_model("baseline", 16, 16)
    model = augmented_model(classifier, AugmentationRanges(), seed=0)
    compile_for_training(model, 1e-3)
    before = classifier.get_layer("logit").get_weights()[0].copy()
    history = model.fit(ArrayBatches(images, np.arange(8) % 2, 8), epochs=1, verbose=0)
    after = classifier.get_layer("logit").get_weights()[0]
    flip = AugmentationRanges(1.0, 0.0, 0.0, 0.0)
    flipped = keras.ops.convert_to_numpy(DeviceAugmentation(flip, seed=0)(images, training=True))
    target = classifier.get_layer("last_conv").output
    grads = backend.make_logit_and_feature_grads(
        keras.Model(classifier.input, target),
        keras.Model(target, classifier.get_layer("logit").output))(images)[2]
    kernel = classifier.get_layer("logit").get_weights()[0][:, 0]
    print(json.dumps({
        **data_parallel,
        "uneven_message": uneven_message,
        "backend": keras.backend.backend(),
        "jit_compile": model.jit_compile,
        "loss": history.history["loss"][0],
        "logit_moved": float(np.abs(after - before).max()),
        "flip_exact": bool(np.array_equal(flipped, images[:, :, ::-1, :])),
        "grad_error": float(np.abs(grads - kernel / 4).max()),
    }))
"""


@pytest.fixture(scope="module")
def jax_checks() -> dict:
    """One JAX process with 2 CPU devices running every JAX-backend check."""
    code = 'MODE = "data-parallel"\n' + textwrap.dedent(ONE_STEP) + textwrap.dedent(JAX_CHECKS)
    return run_python(code, "jax", {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


def test_data_parallel_on_two_jax_devices_matches_one_device(jax_checks: dict) -> None:
    """keras.distribution.DataParallel over 2 CPU devices takes the single-device step."""
    assert len(jax_checks["devices"]) == 2
    assert jax_checks["moved"] > 1e-4
    assert jax_checks["max_difference"] < 1e-4


def test_uneven_batch_split_is_refused(jax_checks: dict) -> None:
    """A global batch that does not divide over the devices is one clear sentence."""
    assert jax_checks["uneven_message"].startswith(
        "--batch-size 7 does not split evenly over 2 devices"
    )


def test_jax_training_step_stays_compiled(jax_checks: dict) -> None:
    """On JAX, the model with augmentation outside the classifier keeps jit_compile=True."""
    assert jax_checks["backend"] == "jax"
    assert jax_checks["jit_compile"] is True
    assert math.isfinite(jax_checks["loss"]) and jax_checks["logit_moved"] > 0


def test_jax_augmentation_flips_exactly(jax_checks: dict) -> None:
    """The flip transform that is exact on TensorFlow is exact on JAX too."""
    assert jax_checks["flip_exact"] is True


def test_jax_logit_gradients_match_the_analytic_gradient(jax_checks: dict) -> None:
    """The JAX gradient helper gives kernel / (h w) through GAP -> Dense (2 x 2 map)."""
    assert jax_checks["grad_error"] < 1e-6


def test_mirrored_on_two_tensorflow_devices_matches_one_device() -> None:
    """MirroredStrategy over 2 logical CPU devices takes the single-device step."""
    setup = """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        DEVICES = [d.name for d in tf.config.list_logical_devices("CPU")]
        MODE = "mirrored"
    """
    code = textwrap.dedent(setup) + textwrap.dedent(ONE_STEP) + "print(json.dumps(data_parallel))"
    result = run_python(code, "tensorflow")
    assert len(result["devices"]) == 2
    assert result["moved"] > 1e-4
    assert result["max_difference"] < 1e-4


def test_data_parallel_needs_jax() -> None:
    """On TensorFlow, data-parallel is refused with the way to get it."""
    with (
        pytest.raises(UserError, match="needs the JAX backend"),
        distribution_scope("data-parallel", 32),
    ):
        pass


def test_non_finite_first_loss_stops_with_the_hint() -> None:
    """A NaN among the first losses raises one sentence that carries the hint."""
    check = FiniteLossCheck(n_batches=2, hint="see keras-team/keras issue 21061")
    check.on_train_begin()
    check.on_train_batch_end(0, {"loss": 0.7})
    with pytest.raises(UserError, match="loss was nan at batch 2; see keras-team/keras issue"):
        check.on_train_batch_end(1, {"loss": math.nan})


def test_losses_after_the_checked_batches_are_not_read() -> None:
    """Only the first n batches are checked (each check syncs the device)."""
    check = FiniteLossCheck(n_batches=1)
    check.on_train_begin()
    check.on_train_batch_end(0, {"loss": 0.5})
    check.on_train_batch_end(1, {"loss": math.inf})


@pytest.fixture()
def job_environment(monkeypatch: pytest.MonkeyPatch):
    """A clean environment for the multi-process variables; returns a setter."""
    for name in (*MULTI_PROCESS_VARIABLES, "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)

    def set_variables(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_variables


JOB = {
    "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234",
    "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
    "KERAS_DISTRIBUTION_PROCESS_ID": "1",
}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"KERAS_DISTRIBUTION_PROCESS_ID": ""},
         "KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES is set but "
         "KERAS_DISTRIBUTION_PROCESS_ID is not"),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"},
         "KERAS_DISTRIBUTION_NUM_PROCESSES='two' must be a whole number >= 1"),
        ({"KERAS_DISTRIBUTION_PROCESS_ID": "2"},
         "KERAS_DISTRIBUTION_PROCESS_ID='2' must be a whole number from 0 to 1"),
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2,c:3"},
         "KERAS_DISTRIBUTION_JOB_ADDRESSES lists 3 addresses but "
         "KERAS_DISTRIBUTION_NUM_PROCESSES is 2"),
    ],
)
def test_bad_job_variables_are_one_sentence(job_environment, changes: dict, message: str) -> None:
    """Incomplete or out-of-range KERAS_DISTRIBUTION_* variables name the variable."""
    job_environment(**{**JOB, **changes})
    with pytest.raises(UserError, match=re.escape(message)):
        join_processes("data-parallel")


def test_a_job_needs_the_jax_backend(job_environment) -> None:
    """Two processes asked for on TensorFlow (this suite's backend): refused before joining."""
    job_environment(**JOB)
    with pytest.raises(UserError, match="ask for 2 processes, but multi-process training "
                                        "needs the JAX backend"):
        join_processes("data-parallel")


def test_slurm_with_several_tasks_is_a_job(job_environment) -> None:
    """Under SLURM, SLURM_NTASKS > 1 asks for a job (JAX then reads SLURM itself)."""
    job_environment(SLURM_JOB_ID="42", SLURM_NTASKS="4")
    with pytest.raises(UserError, match="SLURM ask for 4 processes"):
        join_processes("data-parallel")


def test_nothing_to_join_alone(job_environment) -> None:
    """One SLURM task, no variables, or another mode: one process, process 0, shard (0, 1)."""
    job_environment(SLURM_JOB_ID="42", SLURM_NTASKS="1")
    join_processes("data-parallel")
    job_environment(**JOB)
    join_processes("none")
    assert (process_count(), is_primary(), data_shard()) == (1, True, (0, 1))


def test_each_process_feeds_its_slice_of_the_global_batch(monkeypatch) -> None:
    """Process k of P yields rows [k B/P, (k+1) B/P) of the batch one process would draw."""
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    labels = np.arange(20) % 2
    whole = ArrayBatches(images, labels, 8, shuffle=True, seed=5, drop_remainder=True)
    monkeypatch.setattr(batches, "data_shard", lambda: (1, 2))
    second = ArrayBatches(images, labels, 8, shuffle=True, seed=5, drop_remainder=True)
    assert len(second) == len(whole) == 2
    for index in range(2):
        assert np.array_equal(second[index][0], whole[index][0][4:])
        assert np.array_equal(second[index][2], whole[index][2][4:])
    monkeypatch.setattr(batches, "data_shard", lambda: (0, 3))
    with pytest.raises(UserError, match="--batch-size 8 does not split evenly over 3 processes"):
        ArrayBatches(images, labels, 8)
