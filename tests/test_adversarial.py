"""Adversarial training (pipelines/adversarial.py): the FGSM step, the training graph that mixes
FGSM copies into each batch, train_model with it switched on, and the keys that name a training
and a tuning study (unchanged while the section is off)."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from pipelines.adversarial import (
    AdversarialTraining,
    fgsm_batch,
    logits_function,
    signed_gradient,
)
from pipelines.config import AdversarialParams, ModelParams, Params
from pipelines.model import build_model, to_model_input
from pipelines.train import checkpoint_key, compile_for_training, train_model
from pipelines.tune import study_key
from tests.test_insight import oriented_strokes

SMALL = ModelParams(conv1_filters=8, conv2_filters=8, kernel_size=3, dense_units=16, dropout=0.0)
SOURCE = {"data_source": "mnist", "files": {"a.gz": "0" * 64}}


def untrained(seed: int = 0, params: ModelParams = SMALL) -> keras.Sequential:
    keras.utils.set_random_seed(seed)
    return build_model(params)


def cross_entropy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    probs = np.asarray(model(x, training=False), dtype=np.float64)
    return -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))


@pytest.fixture(scope="module")
def strokes() -> tuple[np.ndarray, np.ndarray]:
    """16 strokes as model input (float32, channel axis) and their int32 labels."""
    images, labels = oriented_strokes(16, seed=3)
    return to_model_input(images), labels.astype(np.int32)


# --- logits and the FGSM step --------------------------------------------------------------------


def test_logits_function_is_the_model_before_its_softmax(strokes) -> None:
    x, _ = strokes
    model = untrained()
    (logits,) = logits_function(model)(tf.constant(x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.softmax(logits)), model(x), atol=1e-6
    )
    features, logits_too = logits_function(model, "conv2")(tf.constant(x))
    assert tuple(features.shape) == (16, 11, 11, 8)
    np.testing.assert_allclose(logits_too, logits, atol=1e-6)
    with pytest.raises(ValueError, match="no layer 'conv9'"):
        logits_function(model, "conv9")
    with pytest.raises(TypeError, match="keras.Sequential"):
        logits_function(keras.Model(model.inputs, model.outputs))


def test_fgsm_batch_stays_in_range_and_within_epsilon(strokes) -> None:
    x, y = strokes
    model = untrained()
    eps = 0.1
    adversarial = fgsm_batch(logits_function(model), tf.constant(x), tf.constant(y), eps).numpy()
    assert adversarial.shape == x.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    step = np.abs(adversarial - x)
    assert step.max() <= eps + 1e-6
    # an untrained net's gradient is zero on much of the blank border, so only some pixels move
    assert (step > 0).mean() > 0.05, "FGSM changed almost no pixel"
    # where the clip does not bite, every pixel moves by exactly eps along the gradient's sign
    sign = signed_gradient(logits_function(model), tf.constant(x), tf.constant(y)).numpy()
    free = (x + eps * sign >= 0) & (x + eps * sign <= 1) & (sign != 0)
    assert free.mean() > 0.05
    np.testing.assert_allclose(adversarial[free], (x + eps * sign)[free], atol=1e-6)
    # ... and the step raises the loss of every image
    gain = cross_entropy(model, adversarial, y) - cross_entropy(model, x, y)
    assert (gain > 0).all(), gain


def test_no_gradient_flows_through_fgsm_batch(strokes) -> None:
    x, y = strokes
    run = logits_function(untrained())
    batch = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(batch)
        total = tf.reduce_sum(fgsm_batch(run, batch, tf.constant(y), 0.1) * 3.0)
    gradient = tape.gradient(total, batch)
    assert gradient is None or not np.asarray(gradient).any()
    # without the stop, the same expression does pass a gradient (the check above can fail)
    with tf.GradientTape() as tape:
        tape.watch(batch)
        total = tf.reduce_sum(tf.clip_by_value(batch + 0.1 * tf.sign(batch), 0.0, 1.0) * 3.0)
    assert np.asarray(tape.gradient(total, batch)).any()


# --- the training graph --------------------------------------------------------------------------


class Recorder(keras.layers.Layer):
    """Identity that keeps a copy of every batch it sees in training mode (eager runs only)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[np.ndarray] = []

    def call(self, x, training: bool = False):
        if training and tf.executing_eagerly():
            self.seen.append(np.array(x))
        return x


def recording_net(seed: int = 0) -> tuple[keras.Sequential, Recorder]:
    """build_model's network with a Recorder in front: it sees exactly what train_step feeds
    ``self.net``."""
    recorder = Recorder(name="recorder")
    net = keras.Sequential([keras.Input(shape=(28, 28, 1)), recorder, *untrained(seed).layers])
    return net, recorder


@pytest.mark.parametrize(("ratio", "n_adversarial"), [(0.5, 8), (0.3, 5), (1.0, 16)])
def test_train_step_feeds_fgsm_copies_of_the_first_ratio_of_the_batch(
    params: Params, strokes, ratio: float, n_adversarial: int
) -> None:
    x, y = strokes
    eps = 0.2
    net, recorder = recording_net()
    # the FGSM copies the step must make: against the weights at the start of the step
    expected = fgsm_batch(logits_function(net), tf.constant(x), tf.constant(y), eps).numpy()
    before = [w.copy() for w in net.get_weights()]
    graph = AdversarialTraining(net, None, epsilon=eps, ratio=ratio)
    compile_for_training(graph, params.train.model_copy(update={"ema_momentum": 0.0}))
    graph.run_eagerly = True  # so the Recorder can copy the batch out
    history = graph.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    # one batch went through the net in training mode: FGSM copies first, then the clean rest
    assert len(recorder.seen) == 1
    fed = recorder.seen[0]
    assert fed.shape == x.shape
    np.testing.assert_allclose(fed[:n_adversarial], expected[:n_adversarial], atol=1e-6)
    np.testing.assert_array_equal(fed[n_adversarial:], x[n_adversarial:])
    assert not np.allclose(fed[:n_adversarial], x[:n_adversarial])
    assert np.abs(fed - x).max() <= eps + 1e-6
    # a real optimiser step on the shared weights, with a finite loss
    loss = history.history["loss"]
    assert len(loss) == 1 and np.isfinite(loss[0]) and loss[0] > 0
    assert 0.0 <= history.history["accuracy"][0] <= 1.0
    after = net.get_weights()
    assert any(not np.allclose(b, a) for b, a in zip(before, after, strict=True))


def test_training_graph_predicts_through_the_shared_model(strokes) -> None:
    x, _ = strokes
    model = untrained()
    graph = AdversarialTraining(model, None, epsilon=0.1, ratio=0.5)
    graph.build((None, 28, 28, 1))
    # call() is the clean model: validation and prediction see no FGSM
    np.testing.assert_allclose(graph(x), model(x), atol=1e-6)
    assert {id(v) for v in graph.trainable_variables} == {id(v) for v in model.trainable_variables}


@pytest.mark.parametrize(
    ("epsilon", "ratio"), [(0.0, 0.5), (-0.1, 0.5), (1.5, 0.5), (0.1, 0.0), (0.1, 1.01)]
)
def test_training_graph_refuses_epsilon_or_ratio_out_of_range(epsilon: float, ratio: float) -> None:
    with pytest.raises(ValueError, match="0 < epsilon <= 1 and 0 < ratio <= 1"):
        AdversarialTraining(untrained(), None, epsilon=epsilon, ratio=ratio)


@pytest.mark.parametrize(
    "bad",
    [
        {"epsilon": 0},
        {"epsilon": -0.1},
        {"epsilon": 1.1},
        {"ratio": 0},
        {"ratio": 1.5},
        {"extra": 1},
    ],
)
def test_adversarial_params_are_validated(bad: dict) -> None:
    good = {"enabled": True, "epsilon": 0.1, "ratio": 0.5}
    assert AdversarialParams(**good).epsilon == 0.1
    AdversarialParams(**{**good, "epsilon": 1.0, "ratio": 1.0})  # both ends included
    with pytest.raises(ValidationError):
        AdversarialParams(**{**good, **bad})


# --- train_model with adversarial training on -----------------------------------------------------


def small_training(params: Params):
    return params.train.model_copy(
        update={
            "max_images": 300,
            "epochs": 1,
            "batch_size": 64,
            "ema_momentum": 0.0,
            "bn_calibration_images": 64,
            "model": SMALL,
        }
    )


def test_train_model_with_adversarial_training_returns_a_plain_serving_model(
    params: Params, tmp_path: Path, caplog
) -> None:
    images, labels = oriented_strokes(300, seed=5)
    train = small_training(params)
    policy = params.augment.model_copy(update={"enabled": True})
    on = params.adversarial.model_copy(update={"enabled": True, "epsilon": 0.1, "ratio": 0.5})
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        result = train_model(train, policy, images, labels, adversarial=on)
    assert "adversarial training on (FGSM eps 0.1 on 50% of each batch)" in caplog.text
    # the serving copy: build_model's plain Sequential, no training graph or augmentation inside
    model = result.model
    assert type(model) is keras.Sequential and model.name == "mnist_cnn"
    assert [layer.name for layer in model.layers] == [
        layer.name for layer in build_model(SMALL).layers
    ]
    assert not any(
        isinstance(layer, AdversarialTraining | keras.Sequential) for layer in model.layers
    )
    assert all(type(layer).__module__.startswith("keras.") for layer in model.layers), [
        type(layer) for layer in model.layers
    ]
    # it saves and loads back without custom objects, and predicts the same
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    x = to_model_input(images[:8])
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    # one epoch, with finite positive training and validation losses
    assert len(result.history["loss"]) == 1
    for key in ("loss", "val_loss"):
        assert np.isfinite(result.history[key][0]) and result.history[key][0] > 0, result.history

    # the same training with the section off ends on other weights: the FGSM copies mattered
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        plain = train_model(
            train, policy, images, labels, adversarial=on.model_copy(update={"enabled": False})
        )
    assert "adversarial training off" in caplog.text
    assert any(
        not np.allclose(a, b)
        for a, b in zip(model.get_weights(), plain.model.get_weights(), strict=True)
    )


# --- the keys that name a training and a study -----------------------------------------------------


def test_checkpoint_key_ignores_the_section_while_it_is_off(params: Params) -> None:
    off = params.adversarial.model_copy(update={"enabled": False})
    before = checkpoint_key(params.train, params.augment, SOURCE)  # the key before the section
    assert checkpoint_key(params.train, params.augment, SOURCE, off) == before
    # its other settings do not matter while it is off
    off_other = off.model_copy(update={"epsilon": 0.3, "ratio": 0.25})
    assert checkpoint_key(params.train, params.augment, SOURCE, off_other) == before
    # on: another training, and another again with another epsilon or ratio
    on = off.model_copy(update={"enabled": True})
    keys = {
        before,
        checkpoint_key(params.train, params.augment, SOURCE, on),
        checkpoint_key(
            params.train, params.augment, SOURCE, on.model_copy(update={"epsilon": 0.3})
        ),
        checkpoint_key(params.train, params.augment, SOURCE, on.model_copy(update={"ratio": 0.25})),
    }
    assert len(keys) == 4
    assert off.identity() == {} and on.identity() == {"adversarial": on.model_dump()}


def test_study_key_ignores_the_section_while_it_is_off(params: Params) -> None:
    off = params.model_copy(
        update={"adversarial": params.adversarial.model_copy(update={"enabled": False})}
    )
    off_other = off.model_copy(
        update={"adversarial": off.adversarial.model_copy(update={"epsilon": 0.3, "ratio": 0.25})}
    )
    on = off.model_copy(
        update={"adversarial": off.adversarial.model_copy(update={"enabled": True})}
    )
    source = {"files": {}}
    assert study_key(off, source) == study_key(off_other, source)
    assert study_key(on, source) != study_key(off, source)
    on_other = on.model_copy(
        update={"adversarial": on.adversarial.model_copy(update={"epsilon": 0.3})}
    )
    assert study_key(on_other, source) != study_key(on, source)
    # still a function of the data, as before
    assert study_key(off, {"files": {"a.gz": "1" * 64}}) != study_key(off, source)
