"""Prompt templates: how a class name becomes a caption.

A template is a ``str.format`` pattern with one ``{}`` for the class name. The paper's
benchmarks use the prompt lists of the FLYP reference implementation (locuslab/FLYP,
``src/templates/<dataset>_template.py``), written here as data, one list per dataset; a recipe
picks another list by name with ``data.templates``.
"""

from __future__ import annotations


class WithArticle(str):
    """A template whose ``{}`` takes the class name after its indefinite article ("an airport",
    "a barn"), as two of the reference's FMoW prompts do. ``format`` is the only call the
    heads and losses make on a template, so this is the one method that differs from ``str``;
    written out as plain text (JSON) it loses the article: rebuild it with :func:`get_templates`.
    """

    def format(self, name: str) -> str:  # type: ignore[override]
        article = "an" if name[:1] in "aeiou" else "a"  # the reference's rule: a vowel letter
        return str.format(self, f"{article} {name}")


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

# --- the reference's lists, in its order -----------------------------------------------------

CALTECH101 = [
    "a photo of a {}.",
    "a painting of a {}.",
    "a plastic {}.",
    "a sculpture of a {}.",
    "a sketch of a {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a rendition of a {}.",
    "a embroidered {}.",
    "a cartoon {}.",
    "a {} in a video game.",
    "a plushie {}.",
    "a origami {}.",
    "art of a {}.",
    "graffiti of a {}.",
    "a drawing of a {}.",
    "a doodle of a {}.",
    "a photo of the {}.",
    "a painting of the {}.",
    "the plastic {}.",
    "a sculpture of the {}.",
    "a sketch of the {}.",
    "a tattoo of the {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "the embroidered {}.",
    "the cartoon {}.",
    "the {} in a video game.",
    "the plushie {}.",
    "the origami {}.",
    "art of the {}.",
    "graffiti of the {}.",
    "a drawing of the {}.",
    "a doodle of the {}.",
]

STANFORD_CARS = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
]

FLOWERS102 = ["a photo of a {}, a type of flower."]

# The reference's PCam prompt has no full stop.
PCAM = ["this is a photo of {}"]

SST2 = ["a {} review of a movie."]

IWILDCAM = ["a photo of {}.", "{} in the wild."]

FMOW = [
    "satellite photo of a {}.",
    "aerial photo of a {}.",
    WithArticle("satellite photo of {}."),
    WithArticle("aerial photo of {}."),
    "satellite photo of a {} in asia.",
    "aerial photo of a {} in asia.",
    "satellite photo of a {} in africa.",
    "aerial photo of a {} in africa.",
    "satellite photo of a {} in the americas.",
    "aerial photo of a {} in the americas.",
    "satellite photo of a {} in europe.",
    "aerial photo of a {} in europe.",
    "satellite photo of a {} in oceania.",
    "aerial photo of a {} in oceania.",
    "a photo of a {}.",
    "{}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {
    "simple": SIMPLE,
    "pacs": PACS,
    "caltech101": CALTECH101,
    "stanford_cars": STANFORD_CARS,
    "flowers102": FLOWERS102,
    "pcam": PCAM,
    "sst2": SST2,
    "iwildcam": IWILDCAM,
    "fmow": FMOW,
}


def get_templates(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(
            f"unknown template set '{name}'; known: {', '.join(sorted(TEMPLATE_SETS))}"
        )
    return list(TEMPLATE_SETS[name])
