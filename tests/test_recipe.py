from pathlib import Path

import pytest

from flyp.recipe import RecipeError, from_dict, load_recipe, validate


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-5\n  epochs: 3\ndata:\n  ood_domains: [a, b]\n")
    recipe = load_recipe(path, ["train.batch_size=8", "model.spec=tiny", "train.lr=3e-4"])
    assert recipe.name == "r"
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.epochs == 3 and recipe.train.batch_size == 8
    assert recipe.data.ood_domains == ["a", "b"]
    assert recipe.model.spec == "tiny"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-5\n")
    assert load_recipe(path).train.lr == pytest.approx(1e-5)


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.learning_rat'"):
        from_dict({"train": {"learning_rat": 1}})
    with pytest.raises(RecipeError, match=r"did you mean 'epochs'"):
        from_dict({"train": {"epoch": 1}})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'modle'"):
        from_dict({"modle": {}})


def test_wrong_type_is_named():
    with pytest.raises(RecipeError, match=r"train.epochs: expected int"):
        from_dict({"train": {"epochs": "five"}})
    with pytest.raises(RecipeError, match=r"data.ood_domains: expected a list"):
        from_dict({"data": {"ood_domains": "sketch"}})
    with pytest.raises(RecipeError, match=r"data.roots: expected a mapping"):
        from_dict({"data": {"roots": "/data"}})
    with pytest.raises(RecipeError, match=r"data.roots.imagenet-r: expected str"):
        from_dict({"data": {"roots": {"imagenet-r": 3}}})
    with pytest.raises(RecipeError, match=r"eval.every_epoch: expected true or false"):
        from_dict({"eval": {"every_epoch": 1}})


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_set_syntax():
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["train.lr"])


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_passes_validation(path):
    assert load_recipe(path).name == path.stem


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  spec: tiny\ntrain:\n  lr: [1e-4\n  epochs: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path} line 5: expected ',' or ']', but got ':'; fix the YAML syntax"
    )


def test_validation_runs_on_every_load_path():
    """from_dict (the Python API) and validate() on a hand-built recipe refuse the same value."""
    with pytest.raises(RecipeError, match=r"^train.batchnorm: 'freeze' is not one of"):
        from_dict({"train": {"batchnorm": "freeze"}})
    recipe = from_dict({})
    recipe.data.ood_domains = ["photo"]
    with pytest.raises(RecipeError, match=r"holds the ID domain 'photo'"):
        validate(recipe)


@pytest.mark.parametrize(
    "override, ok",
    [
        ("train.lr=0", True),  # a frozen run (zero-shot through the loop) is legitimate
        ("train.logit_scale_lr=0", True),  # 0 freezes the temperature
        ("train.grad_clip=null", True),
        ("eval.wise_alphas=[0, 1]", True),
        ("train.device=cuda:1", True),
        ("data.val_fraction=0.5", True),
        ("data.val_fraction=0.8", False),  # with test_fraction 0.2: nothing left to train on
        ("eval.wise_alphas=[-0.1]", False),
        ("train.max_logit_scale=1e999", False),  # YAML reads it as inf
    ],
)
def test_range_edges(override, ok):
    if ok:
        load_recipe(None, [override])
    else:
        with pytest.raises(RecipeError):
            load_recipe(None, [override])
