"""Prompt templates: how a class name becomes a caption."""

from __future__ import annotations

SIMPLE = ["a photo of a {}."]

# PACS spans photos, paintings, cartoons and sketches; the templates name no domain-specific
# style beyond a few generic depictions, so the zero-shot head is not tuned to the OOD domains.
PACS = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a drawing of a {}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {"simple": SIMPLE, "pacs": PACS}


def get_templates(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(
            f"unknown template set '{name}'; known: {', '.join(sorted(TEMPLATE_SETS))}"
        )
    return list(TEMPLATE_SETS[name])
