"""params.yaml: typed, frozen, and every mistake is an error that names the key."""

from __future__ import annotations

import pytest
import yaml
from conftest import PARAMS_PATH
from pydantic import ValidationError

from pipelines.config import (
    AugmentParams,
    Params,
    ParamsError,
    deep_merge,
    load_params,
    parse_params,
    read_yaml,
)


def with_override(override: dict) -> dict:
    return deep_merge(read_yaml(PARAMS_PATH), override)


def test_params_yaml_loads_into_typed_sections(params: Params) -> None:
    # given the repository's params.yaml (loaded by the fixture)
    # then every section is there with its types
    assert params.tracking.experiment == "mnist-classifier"
    assert set(params.ingest.files) == {
        "train_images",
        "train_labels",
        "test_images",
        "test_labels",
    }
    assert params.validate.image_shape == (28, 28)
    assert params.register.challenger_alias == "challenger"
    assert isinstance(params.train.model.dropout, float)
    assert params.augment.zoom_min <= params.augment.zoom_max


def test_unknown_key_is_an_error_naming_its_dotted_path() -> None:
    # given a typo in the train section
    raw = with_override({"train": {"epochz": 3}})
    # when it is parsed
    with pytest.raises(ParamsError) as info:
        parse_params(raw, source="typo.yaml")
    # then the message names the file and the key by its full path
    assert "typo.yaml" in str(info.value)
    assert "train.epochz" in str(info.value)


def test_wrong_type_is_an_error_naming_the_key() -> None:
    # given a string where an int belongs
    raw = with_override({"train": {"epochs": "many"}})
    # when / then
    with pytest.raises(ParamsError, match=r"train\.epochs") as info:
        parse_params(raw)
    assert "'many'" in str(info.value)


def test_aliased_sections_are_named_by_their_yaml_name() -> None:
    # given bad values in the two sections whose Python field carries a trailing underscore
    raw = with_override({"validate": {"min_train_images": 0}, "register": {"min_accuracy": 2}})
    # when
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    # then the keys read as in params.yaml
    message = str(info.value)
    assert "validate.min_train_images" in message
    assert "register.min_accuracy" in message
    assert "validate_" not in message and "register_" not in message


def test_zoom_min_above_zoom_max_fails() -> None:
    # given an inverted zoom range
    raw = with_override({"augment": {"zoom_min": 1.2, "zoom_max": 0.8}})
    # when / then
    with pytest.raises(ParamsError, match="zoom_min"):
        parse_params(raw)
    # and the section model alone refuses it too
    fields = {**read_yaml(PARAMS_PATH)["augment"], "zoom_min": 1.2, "zoom_max": 0.8}
    with pytest.raises(ValidationError):
        AugmentParams(**fields)


def test_a_shadow_on_the_served_alias_itself_fails() -> None:
    with pytest.raises(ParamsError, match="serve.shadow: 'champion' is the served alias itself"):
        parse_params(with_override({"serve": {"shadow": "champion"}}))
    assert parse_params(with_override({"serve": {"shadow": "challenger"}})).serve.shadow


def test_missing_file_and_non_mapping_yaml_name_the_file(tmp_path) -> None:
    # given a missing file and a YAML list
    missing = tmp_path / "nope.yaml"
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2, 3]))
    # when / then
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(missing)
    with pytest.raises(ParamsError, match="list.yaml: expected a mapping"):
        load_params(listy)


def test_deep_merge_merges_nested_dicts_without_touching_the_base() -> None:
    # given
    base = {"a": 1, "train": {"epochs": 20, "model": {"dropout": 0.5, "dense_units": 128}}}
    override = {"train": {"model": {"dropout": 0.3}}, "b": 2}
    # when
    merged = deep_merge(base, override)
    # then the override wins only where it speaks
    assert merged == {
        "a": 1,
        "b": 2,
        "train": {"epochs": 20, "model": {"dropout": 0.3, "dense_units": 128}},
    }
    assert base["train"]["model"]["dropout"] == 0.5


def test_deep_merge_replaces_a_non_dict_with_a_dict() -> None:
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert deep_merge({"a": {"b": 2}}, {"a": 3}) == {"a": 3}


def test_params_are_frozen(params: Params) -> None:
    # when code tries to change a setting, then it is refused
    with pytest.raises(ValidationError, match="frozen"):
        params.train.epochs = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        params.train.model.dropout = 0.1  # type: ignore[misc]
    assert params.train.epochs == load_params(PARAMS_PATH).train.epochs
