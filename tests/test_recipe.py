import pytest

from flyp.recipe import RecipeError, from_dict, load_recipe


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
