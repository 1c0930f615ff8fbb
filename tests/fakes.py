"""Fake datasets written by tests: tiny images in the layouts flyp reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = [
    (220, 40, 40),
    (40, 200, 40),
    (40, 40, 220),
    (220, 220, 40),
    (200, 40, 200),
    (40, 200, 200),
]


def make_domains(
    root: Path,
    domains: list[str],
    classes: list[str],
    per_class: int = 6,
    size: int = 24,
    seed: int = 0,
) -> Path:
    """A fake <root>/<domain>/<class>/<image>.png tree; each class has its own colour, each
    domain a different brightness, so a tiny model can learn it and OOD differs from ID."""
    rng = np.random.default_rng(seed)
    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=float) * (1 - 0.25 * d)
                pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    """Recipe overrides for the tiny model on a fake tree made by make_domains (photo ID)."""
    return [
        "model.spec=tiny",
        "data.benchmark=folders",
        f"data.root={root}",
        "data.id_domain=photo",
        "data.ood_domains=[art, sketch]",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "train.batch_size=6",
        "train.epochs=3",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        *extra,
    ]


# CUDA float32 matmuls as TF32 (10-bit mantissa, ~5e-4 relative), as flyp.precision.
# configure_device sets them for a run or predict on a GPU: the absolute error that allows in a
# tiny model's probabilities and unit features.
TF32_ATOL = 2e-3


def tf32_atol(atol: float) -> float:
    """``atol`` for a value computed on the device against one computed on the CPU, widened to
    TF32's where CUDA float32 matmuls run as TF32 (FLYP_TEST_DEVICE=cuda); on the CPU as given."""
    if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        return max(atol, TF32_ATOL)
    return atol


def error_lines(err: str) -> list[str]:
    """The non-empty lines of captured stderr, less flyp's progress and notice lines (each
    starts with the time of day: flyp.tracking.say): what a bad input must answer in one line."""
    return [
        line
        for line in err.splitlines()
        if line.strip() and not (line[:8].replace(":", "").isdigit() and line[8:9] == " ")
    ]


HF_WORDS = ["[PAD]", "[UNK]", "a", "photo", "of", "the", "dog", "cat", "."]


def make_tiny_hf(kind: str, folder: Path, image_processor: bool = False) -> Path:
    """A tiny random Hugging Face CLIP or SigLIP folder (model, word-level tokenizer and, for
    CLIP with ``image_processor``, a 32 px image processor), loadable offline."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = dict(
        vocab_size=len(HF_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(
            text_config=text | {"eos_token_id": 2}, vision_config=vision, projection_dim=8
        )
        transformers.CLIPModel(config).save_pretrained(folder)
        if image_processor:
            processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
            processor.save_pretrained(folder)
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        transformers.SiglipModel(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(HF_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(folder)
    return folder


def leave_process_group() -> None:
    """The last step of a test's spawned rank once its results are written: wait for every rank,
    then exit at once, without tearing gloo down.

    gloo's teardown (``destroy_process_group``, or the interpreter's exit with the group alive)
    aborted a rank with SIGABRT ("terminate called without an active exception") in 3 of 15
    runs of tests/test_per_node.py's two-rank finetune tests, each time after both ranks had
    written the right results: a crash of the harness, not of the behaviour under test. A rank
    that fails raises before this, and its group is torn down as usual."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()  # no rank leaves while another still talks to the group
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a run's last checkpoint (``state.pt`` holds them with its state)."""
    from flyp.checkpoint import load_checkpoint

    return load_checkpoint(Path(run_dir) / "state.pt")["weights"]
