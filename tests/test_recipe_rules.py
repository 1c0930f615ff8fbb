"""The recipe's rules, declared beside each field (flyp.recipe.setting): each key refused past its
bound or outside its choices with its own one-line message, each bound itself accepted, and the
keys a resumed run may change. The messages are pinned as the hand-written tables gave them."""

import pytest

from flyp.recipe import RESUME_SETTABLE, RecipeError, load_recipe

REFUSED = [
    ('model.image_size=0', 'model.image_size: 0 is out of range; it must be >= 1'),
    ('model.context_length=0', 'model.context_length: 0 is out of range; it must be >= 1'),
    ('data.val_fraction=0', 'data.val_fraction: 0.0 is out of range; it must be between 0 and 1'),
    ('data.val_fraction=1', 'data.val_fraction: 1.0 is out of range; it must be between 0 and 1'),
    ('data.test_fraction=0', 'data.test_fraction: 0.0 is out of range; it must be between 0 and 1'),
    ('data.test_fraction=1.5', 'data.test_fraction: 1.5 is out of range; it must be between 0 and 1'),
    ('data.split_seed=-1', 'data.split_seed: -1 is out of range; a seed must be between 0 and 4294967295'),
    ('data.split_seed=4294967296', 'data.split_seed: 4294967296 is out of range; a seed must be between 0 and 4294967295'),
    ('data.max_train=0', 'data.max_train: 0 is out of range; it must be >= 1'),
    ('data.max_eval=0', 'data.max_eval: 0 is out of range; it must be >= 1'),
    ('data.templates=pac', "data.templates: 'pac' is not one of caltech101, flowers102, fmow, generic, iwildcam, pacs, pcam, simple, sst2, stanford_cars (did you mean 'pacs'?)"),
    ('data.on_bad_image=skipp', "data.on_bad_image: 'skipp' is not one of error, skip (did you mean 'skip'?)"),
    ('data.num_workers=many', "data.num_workers: 'many' is not a number of workers; use auto or a whole number >= 0"),
    ('data.num_workers=-1', 'data.num_workers: -1 is out of range; it must be >= 0'),
    ('data.cache_gb=-0.5', 'data.cache_gb: -0.5 is out of range; it must be >= 0'),
    ('data.k_shot=0', 'data.k_shot: 0 is out of range; it must be >= 1'),
    ('data.ood_domains=[sketch, art, sketch]', "data.ood_domains lists 'sketch' twice; list each domain once"),
    ('train.method=flip', "train.method: 'flip' is not one of zeroshot, flyp, flyp-image-only, flyp-mask, flyp-soft, ft, l2sp, lipsum-ft, lp, lpft, ce-both (did you mean 'flyp'?)"),
    ('train.epochs=0', 'train.epochs: 0 is out of range; it must be >= 1'),
    ('train.batch_size=0', 'train.batch_size: 0 is out of range; it must be >= 1'),
    ('train.lr=-1e-5', 'train.lr: -1e-05 is out of range; it must be >= 0'),
    ('train.weight_decay=-0.1', 'train.weight_decay: -0.1 is out of range; it must be >= 0'),
    ('train.warmup_steps=-1', 'train.warmup_steps: -1 is out of range; it must be >= 0'),
    ('train.grad_clip=0', 'train.grad_clip: 0.0 is out of range; it must be > 0'),
    ('train.seed=4294967296', 'train.seed: 4294967296 is out of range; a seed must be between 0 and 4294967295'),
    ('train.batchnorm=freeze', "train.batchnorm: 'freeze' is not one of frozen, train (did you mean 'frozen'?)"),
    ('train.logit_scale_lr=-1', 'train.logit_scale_lr: -1.0 is out of range; it must be >= 0'),
    ('train.init_logit_scale=0', 'train.init_logit_scale: 0.0 is out of range; it must be > 0'),
    ('train.max_logit_scale=0', 'train.max_logit_scale: 0.0 is out of range; it must be > 0'),
    ('train.l2sp_weight=-1', 'train.l2sp_weight: -1.0 is out of range; it must be >= 0'),
    ('train.lipsum_weight=-1', 'train.lipsum_weight: -1.0 is out of range; it must be >= 0'),
    ('train.lipsum_texts=0', 'train.lipsum_texts: 0 is out of range; it must be >= 1'),
    ('train.lipsum_text=word', "train.lipsum_text: 'word' is not one of tokens, words (did you mean 'words'?)"),
    ('train.collisions=masks', "train.collisions: 'masks' is not one of none, mask, soft (did you mean 'mask'?)"),
    ('train.contrastive_loss=sigmoid', "train.contrastive_loss: 'sigmoid' is not one of auto, clip, siglip (did you mean 'siglip'?)"),
    ('train.checkpoint_every=-1', 'train.checkpoint_every: -1 is out of range; it must be >= 0'),
    ('train.log_every=0', 'train.log_every: 0 is out of range; it must be >= 1'),
    ('train.stop_after_steps=0', 'train.stop_after_steps: 0 is out of range; it must be >= 1'),
    ('train.select_on=best', "train.select_on: 'best' is not one of val, last"),
    ('train.device=gpu', "train.device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps (did you mean 'cuda'?)"),
    ('train.dist_timeout_s=0', 'train.dist_timeout_s: 0.0 is out of range; it must be > 0'),
    ('train.precision=fp16', "train.precision: 'fp16' is not one of auto, fp32, bf16 (did you mean 'bf16'?)"),
    ('train.micro_batch=0', 'train.micro_batch: 0 is out of range; it must be >= 1'),
    ('train.log_to=[tensorbord]', "train.log_to[0]: 'tensorbord' is not one of tensorboard, wandb (did you mean 'tensorboard'?)"),
    ('train.log_to=[wandb, wandb]', "train.log_to lists 'wandb' twice; list each tracker once"),
    ('eval.batch_size=0', 'eval.batch_size: 0 is out of range; it must be >= 1'),
    ('eval.wise_alphas=[]', 'eval.wise_alphas is empty; give at least one alpha, e.g. [0, 0.5, 1]'),
    ('eval.wise_alphas=[0, 1.5]', 'eval.wise_alphas[1]: 1.5 is out of range; it must be in [0, 1]'),
    ('eval.cache_gb=-1', 'eval.cache_gb: -1.0 is out of range; it must be >= 0'),
    ('eval.precision=half', "eval.precision: 'half' is not one of auto, fp32, bf16"),
    ('name=a/b', "name: 'a/b' cannot name a run folder (runs/<name>-<method>-s<seed>); use letters, digits, spaces, '-' or '_', with no '/', no control characters"),
]


@pytest.mark.parametrize(("assignment", "message"), REFUSED, ids=[a for a, _ in REFUSED])
def test_each_rule_refuses_with_its_message(assignment, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, [assignment])
    assert str(caught.value) == message


ACCEPTED = [
    "model.image_size=1",
    "data.val_fraction=0.01",
    "data.split_seed=4294967295",
    "data.num_workers=0",
    "data.num_workers=auto",
    "data.cache_gb=0",
    "data.templates=simple",
    "train.lr=0",
    "train.weight_decay=0",
    "train.warmup_steps=0",
    "train.grad_clip=1e-9",
    "train.seed=0",
    "train.logit_scale_lr=0",
    "train.checkpoint_every=0",
    "train.log_every=1",
    "train.device=cuda:3",  # a valid name (whether this machine has it is checked at the run)
    "train.log_to=[tensorboard, wandb]",
    "eval.wise_alphas=[0, 1]",
    "eval.cache_gb=0",
]


@pytest.mark.parametrize("assignment", ACCEPTED)
def test_each_bound_itself_is_accepted(assignment):
    load_recipe(None, [assignment])


def test_unset_optional_keys_are_not_checked():
    """None means "not set": a bound applies only to a value."""
    recipe = load_recipe(None, ["train.grad_clip=null", "data.max_train=null", "data.templates=null"])
    assert recipe.train.grad_clip is None and recipe.data.templates is None


def test_several_bad_values_name_the_first_in_recipe_order():
    with pytest.raises(RecipeError, match=r"^data\.val_fraction: "):
        load_recipe(None, ["train.epochs=0", "data.val_fraction=2"])


def test_the_keys_a_resume_may_change():
    assert RESUME_SETTABLE == (
        "data.root",
        "data.num_workers",
        "data.cache_gb",
        "data.roots",
        "train.checkpoint_every",
        "train.log_every",
        "train.stop_after_steps",
        "train.device",
        "train.dist_timeout_s",
        "train.micro_batch",
        "train.compile",
        "eval.batch_size",
        "eval.cache_gb",
    )

