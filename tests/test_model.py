"""The CNN as a pure function of ModelParams, and the uint8 -> model input conversion."""

from __future__ import annotations

import numpy as np

from pipelines.config import Params
from pipelines.data import Dataset
from pipelines.model import build_model, to_model_input


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
    expected = ["conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "dense", "dropout", "probs"]
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
