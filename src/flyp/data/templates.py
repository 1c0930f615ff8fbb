"""Prompt templates: how a class name becomes a caption."""

from __future__ import annotations

SIMPLE = ["a photo of a {}."]

# open_clip's seven "simple" ImageNet templates. On the PACS photo validation split (the only
# data used to choose) they beat one template, a generic five and OpenAI's eighty for the default
# model's zero-shot head (83.2 vs 75.4 / 79.0 / 80.8 at 224 px).
PACS = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {"simple": SIMPLE, "pacs": PACS}


def get_templates(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(
            f"unknown template set '{name}'; known: {', '.join(sorted(TEMPLATE_SETS))}"
        )
    return list(TEMPLATE_SETS[name])
