"""The recipe loader answers every input with a recipe or one line (issue 22, item 5).

Property-based (hypothesis, bounded to about 20 s in all): recipes built from the schema's own
keys with values of every YAML kind, arbitrary YAML documents, and ``--set`` assignments. Each
must load, or raise RecipeError with a one-line message; anything else (TypeError,
RecursionError, OverflowError, ...) is a bug. The cases found by hand are pinned below it.
"""

from __future__ import annotations

import datetime
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyp.recipe import FIELDS, RecipeError, load_recipe

KEYS = sorted(key for key, _ in FIELDS)  # "section.key" of every recipe field
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**1023, max_value=2**1100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["010", "1:30", "0x1F", "1_000", "1e3", "nan", ".inf", "auto", "", "~"]),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(), st.none()), inner, max_size=4),
    ),
    max_leaves=8,
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _answers(load) -> None:
    """``load()`` gives a recipe or a one-line RecipeError, nothing else."""
    try:
        load()
    except RecipeError as err:
        assert str(err) and "\n" not in str(err), str(err)


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=4))
def test_recipes_from_the_schema_load_or_are_refused_in_one_line(tmp_path_factory, flat):
    raw: dict = {}
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _answers(lambda: load_recipe(path))


@FUZZ
@given(st.one_of(values, st.dictionaries(st.sampled_from(SECTIONS), values, max_size=3)))
def test_any_yaml_document_loads_or_is_refused_in_one_line(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _answers(lambda: load_recipe(path))


@FUZZ
@given(st.sampled_from(KEYS + SECTIONS + ["nope", "train.nope", ""]), st.text(max_size=40))
def test_set_assignments_load_or_are_refused_in_one_line(key, text):
    _answers(lambda: load_recipe(None, [f"{key}={text}"]))


# --- the cases the sweep found ------------------------------------------------------------------


def _refused(text: str, tmp_path, match: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


@pytest.mark.parametrize("key", ["1: 2", "null: x", "2024-01-02: x", "train: {1: 2}"])
def test_keys_that_are_not_names_are_refused(key, tmp_path):
    _refused(f"name: r\n{key}\n", tmp_path, r"is not a name")


def test_nesting_without_end_is_refused_in_one_line(tmp_path):
    _refused("train: " + "[" * 2000 + "]" * 2000 + "\n", tmp_path, "nested too deeply")


def test_an_integer_too_large_for_a_float_is_refused(tmp_path):
    _refused(f"train:\n  lr: {2**1100}\n", tmp_path, "train.lr: .* is too large")


@pytest.mark.parametrize(
    "text, expected",
    [("010", 10), ("0o10", 8), ("0x10", 16), ("+3", 3), ("1e3", 1000.0), (".5", 0.5), ("3.", 3.0)],
)
def test_numbers_are_read_as_yaml_1_2(text, expected):
    """YAML 1.1 (PyYAML) reads 010 as 8 and 1:30 as 90; a recipe reads numbers as YAML 1.2."""
    key = "train.epochs" if isinstance(expected, int) else "train.lr"
    recipe = load_recipe(None, [f"{key}={text}"])
    assert getattr(recipe.train, key.split(".")[1]) == expected


@pytest.mark.parametrize("text", ["1:30", "1_000", "0b101", "1:30.5", "'12'"])
def test_yaml_1_1_only_numbers_are_refused_not_misread(text):
    with pytest.raises(RecipeError, match=r"train.epochs: expected (int, got the text|int, got '.*' \(str\))"):
        load_recipe(None, [f"train.epochs={text}"])


@pytest.mark.parametrize("value", ["null", "[]", "0", "''", "x"])
def test_a_section_given_as_no_mapping_is_refused_not_reset(value, tmp_path):
    _refused(f"name: r\ntrain: {value}\n", tmp_path, "train: expected a mapping of settings")


def test_set_of_a_whole_section_is_refused_not_reset():
    with pytest.raises(RecipeError, match="train: expected a mapping of settings"):
        load_recipe(None, ["train.lr=0.5", "train="])


@pytest.mark.parametrize("text, name", [('name: "1e3"\n', "1e3"), ("name: 'nan'\n", "nan"), ("name: '010'\n", "010")])
def test_quoted_strings_stay_strings(text, name, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(path).name == name
    assert load_recipe(None, [f'name="{name}"']).name == name


@pytest.mark.parametrize(
    "assignment, bound",
    [
        ("model.image_size=1000000", "<= 8192"),
        ("data.num_workers=100000", "<= 1024"),
        ("train.epochs=1000000000000", "<= 100000"),
        ("train.warmup_steps=1000000000000", "<= 1000000000"),
        ("data.cache_gb=1e300", "<= 100000"),  # written 100_000 beside the field
        ("eval.cache_gb=1e300", "<= 100000"),
        ("train.batch_size=10000000000", "<= 10000000"),
    ],
)
def test_values_no_one_can_mean_are_refused(assignment, bound):
    with pytest.raises(RecipeError, match=f"out of range; it must be {bound}"):
        load_recipe(None, [assignment])


def test_a_name_too_long_for_a_folder_is_refused():
    with pytest.raises(RecipeError, match="name: .* is 300 characters"):
        load_recipe(None, ["name=" + "x" * 300])


def test_a_recipe_file_whose_stem_names_no_folder_says_to_write_a_name(tmp_path):
    path = tmp_path / "..yaml"
    path.write_text("train:\n  lr: 0.001\n")
    with pytest.raises(RecipeError, match=r"\.\.yaml: its file name gives no run name .* add name:"):
        load_recipe(path)
    path.write_text("name: ok\ntrain:\n  lr: 0.001\n")
    assert load_recipe(path).name == "ok"


def test_dates_and_special_floats_are_answered(tmp_path):
    assert math.isnan(float("nan"))  # the loader's own: .nan is a float, refused by the range
    with pytest.raises(RecipeError, match="train.lr"):
        load_recipe(None, ["train.lr=.nan"])
    _refused(f"name: {datetime.date(2024, 1, 2)}\n", tmp_path, "name: expected str")
