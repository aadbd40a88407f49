"""The CNN as a pure function of ModelParams, and the uint8 -> model input conversion."""

from __future__ import annotations

import numpy as np

from pipelines.config import Params
from pipelines.data import Dataset
from pipelines.model import build_model, to_model_input
from tests.conftest import make_arrays


def test_model_outputs_a_probability_per_digit(params: Params, tiny_dataset: Dataset) -> None:
    # given the baseline model and 4 images
    model = build_model(params.train.model)
    x = to_model_input(tiny_dataset.x_test[:4])
    # when
    probs = np.asarray(model.predict(x, verbose=0))
    # then one row of 10 probabilities per image
    assert probs.shape == (4, 10)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_model_layers_have_stable_names(params: Params) -> None:
    model = build_model(params.train.model)
    names = [layer.name for layer in model.layers]
    expected = ["conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "conv3", "bn3"]
    expected += ["dense", "dropout", "probs"]
    assert params.train.model.conv3_filters  # the default has the third block
    assert [n for n in names if n != "flatten"] == expected
    assert model.get_layer("conv1").filters == params.train.model.conv1_filters
    assert model.get_layer("dense").units == params.train.model.dense_units
    assert model.get_layer("dropout").rate == params.train.model.dropout


def test_wider_params_give_a_bigger_model(params: Params) -> None:
    # given a variant with twice the filters and units
    base = params.train.model
    wide = base.model_copy(
        update={
            "conv1_filters": base.conv1_filters * 2,
            "conv2_filters": base.conv2_filters * 2,
            "dense_units": base.dense_units * 2,
        }
    )
    # when / then
    assert build_model(wide).count_params() > build_model(base).count_params()


def test_third_block_and_same_padding_change_the_shapes(params: Params) -> None:
    # given the seed's baseline, with a third Conv-BN block, and that with "same" padding
    base = params.train.model.model_copy(
        update={"conv2_filters": 64, "conv3_filters": 0, "padding": "valid"}
    )
    deep = base.model_copy(update={"conv3_filters": 128})
    deep_same = deep.model_copy(update={"padding": "same"})

    def shapes(model_params) -> tuple[list[str], tuple]:
        model = build_model(model_params)
        names = [layer.name for layer in model.layers]
        return names, tuple(model.get_layer("flatten").input.shape[1:])

    # then valid padding shrinks 28 -> 26 -> 13 -> 11 -> 5 (-> 3), same padding only pools
    assert shapes(base) == (
        ["conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "flatten", "dense", "dropout", "probs"],
        (5, 5, 64),
    )
    assert shapes(deep)[0][6:9] == ["conv3", "bn3", "flatten"]  # no pooling after the third conv
    assert shapes(deep)[1] == (3, 3, 128)
    assert shapes(deep_same)[1] == (7, 7, 128)


def test_to_model_input_scales_and_adds_a_channel() -> None:
    # given uint8 images at both ends of the range
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1] = 255
    images[2, 0, 0] = 51
    # when
    x = to_model_input(images)
    # then
    assert x.shape == (3, 28, 28, 1)
    assert x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert x[2, 0, 0, 0] == np.float32(51 / 255)


def test_fused_batchnorm_is_the_same_maths_as_the_stock_layer(params: Params) -> None:
    import keras
    import tensorflow as tf

    # given the stock model and the fused training variant with the same (seeded) weights, and
    # digit-like strokes as input. (Keras' stock BatchNorm computes the variance as
    # E[x^2] - E[x]^2; on a channel that is almost dead for the batch that float32 cancellation
    # alone moves gradients by percents, whichever layer is right, so the weights are fixed.)
    # A fixed architecture (params.yaml's default may change): the seed's widths plus conv3 128.
    shape = params.train.model.model_copy(
        update={"conv2_filters": 64, "conv3_filters": 128, "dense_units": 128}
    )
    keras.utils.set_random_seed(0)
    stock = build_model(shape)
    fused = build_model(shape, fused_batchnorm=True)
    fused.set_weights(stock.get_weights())
    x = tf.constant(to_model_input(make_arrays()[0][:32]))
    y = tf.constant(np.arange(32) % 10)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def step(model: keras.Model):
        with tf.GradientTape() as tape:
            # Everything in training mode except Dropout, whose random masks would differ.
            h = x
            for layer in model.layers:
                h = layer(h, training=not isinstance(layer, keras.layers.Dropout))
            loss = loss_fn(y, h)
        return loss, tape.gradient(loss, model.trainable_weights)

    # when one training-mode pass runs through each
    stock_loss, stock_grads = step(stock)
    fused_loss, fused_grads = step(fused)
    # then the loss, every gradient and the updated moving statistics agree
    np.testing.assert_allclose(float(fused_loss), float(stock_loss), rtol=1e-5)
    for weight, a, b in zip(stock.trainable_weights, stock_grads, fused_grads, strict=True):
        relative = np.linalg.norm(b.numpy() - a.numpy()) / np.linalg.norm(a.numpy())
        assert relative < 1e-4, f"{weight.path}: gradients differ by {relative:.1e}"
    for name in ("bn1", "bn2"):
        for attr in ("moving_mean", "moving_variance"):
            before = getattr(stock.get_layer(name), attr).numpy()
            after = getattr(fused.get_layer(name), attr).numpy()
            assert not np.allclose(before, 0.0 if attr == "moving_mean" else 1.0)  # it did move
            # the fused kernel uses n/(n-1) for the moving variance; n >= 32*5*5 here
            np.testing.assert_allclose(after, before, rtol=2e-3, atol=1e-6)


def test_serving_copy_has_stock_layers_and_the_same_predictions(
    params: Params, tiny_dataset: Dataset
) -> None:
    from pipelines.model import FusedBatchNormalization, serving_copy

    # given a training variant
    fused = build_model(params.train.model, fused_batchnorm=True)
    # when copied for serving
    copy = serving_copy(fused, params.train.model)
    # then no custom layer is left, and predictions are identical
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in copy.layers)
    x = to_model_input(tiny_dataset.x_test[:8])
    np.testing.assert_array_equal(copy.predict(x, verbose=0), fused.predict(x, verbose=0))


def test_compute_dtype_follows_train_precision(tmp_path) -> None:
    from pipelines.model import compute_dtype, native_bf16_cpu

    # explicit settings are taken as they are
    assert compute_dtype("float32") == "float32"
    assert compute_dtype("bfloat16") == "mixed_bfloat16"
    # auto reads the CPU's flags: AVX512-BF16 or AMX means native bfloat16
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert native_bf16_cpu(with_bf16) and not native_bf16_cpu(without)
    assert not native_bf16_cpu(tmp_path / "missing")
    assert compute_dtype("auto") == ("mixed_bfloat16" if native_bf16_cpu() else "float32")


def test_bfloat16_model_keeps_float32_weights_and_probabilities(
    params: Params, tiny_dataset: Dataset
) -> None:
    from pipelines.model import serving_copy

    # given the training variant built in mixed bfloat16
    mixed = build_model(params.train.model, fused_batchnorm=True, dtype="mixed_bfloat16")
    # then every layer but the softmax computes in bfloat16, and every weight is float32
    computes = {layer.name: layer.compute_dtype for layer in mixed.layers}
    assert computes.pop("probs") == "float32"
    assert set(computes.values()) == {"bfloat16"}
    assert {w.dtype for w in mixed.weights} == {"float32"}
    x = to_model_input(tiny_dataset.x_test[:8])
    probs = mixed.predict(x, verbose=0)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # and its serving copy is all float32 with the same weights, predicting within bfloat16's rounding
    copy = serving_copy(mixed, params.train.model)
    assert {layer.compute_dtype for layer in copy.layers} == {"float32"}
    for ours, theirs in zip(copy.get_weights(), mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(copy.predict(x, verbose=0), probs, atol=0.02)
