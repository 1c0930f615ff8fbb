"""Prompt templates: how a class name becomes a caption.

A template is a ``str.format`` pattern with one ``{}`` for the class name. The paper's
benchmarks use the prompt lists of the FLYP reference implementation (locuslab/FLYP,
``src/templates/<dataset>_template.py``), written here as data, one list per dataset; a recipe
picks another list by name with ``data.templates``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path


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
    "generic": PACS,  # open_clip's seven: no domain of their own; PACS's prompts by name
    "pacs": PACS,
    "caltech101": CALTECH101,
    "stanford_cars": STANFORD_CARS,
    "flowers102": FLOWERS102,
    "pcam": PCAM,
    "sst2": SST2,
    "iwildcam": IWILDCAM,
    "fmow": FMOW,
}


# Words in a dataset's name (its recipe name or folder) that pick a template set made for it.
FITTING = {
    "pacs": "pacs",
    "caltech": "caltech101",
    "cars": "stanford_cars",
    "flower": "flowers102",
    "pcam": "pcam",
    "camelyon": "pcam",
    "sst": "sst2",
    "iwildcam": "iwildcam",
    "fmow": "fmow",
}


def fitting_set(*names: str) -> str:
    """The template set made for a dataset named ``names`` (its recipe name, its folder), else
    'generic' (open_clip's seven, which name no domain): never another dataset's prompts."""
    for name in names:
        folded = name.casefold()
        for word, set_name in FITTING.items():
            if word in folded:
                return set_name
    return "generic"


def get_templates(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise ValueError(
            f"unknown template set '{name}'; known: {', '.join(sorted(TEMPLATE_SETS))}"
        )
    return check_templates(TEMPLATE_SETS[name], f"template set '{name}'")


# ---- the one rule for a template, wherever it comes from (set, file, weights metadata) ----


class TemplateError(ValueError):
    """A template that does not take exactly one class name; the message says where it is."""


def template_problem(template: object) -> str | None:
    """What is wrong with one template, or None: it must be a string with exactly one ``{}``
    field, positional and plain (no name, index, conversion or format spec); literal braces are
    written ``{{`` and ``}}``."""
    if not isinstance(template, str):
        return f"{template!r} is not text"
    try:
        fields = [(f, s, c) for _, f, s, c in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # "Single '}' encountered", "expected '}' before end of string"
        return f"{template!r} has unbalanced braces ({err}); write literal braces as {{{{ and }}}}"
    bad = [(f, spec, conv) for f, spec, conv in fields if f or spec or conv]
    if bad:
        f, spec, conv = bad[0]
        shown = "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        return f"{template!r} has the field {shown}; use a plain {{}} for the class name"
    if len(fields) != 1:
        return (
            f"{template!r} has {len(fields)} {{}} fields; a template has exactly one {{}} "
            "for the class name, e.g. 'a photo of a {}.'"
        )
    return None


def check_templates(templates: Sequence[object], where: str) -> list[str]:
    """``templates`` if every one is valid and there is at least one; else a TemplateError
    naming ``where`` and the template's position (1-based)."""
    templates = list(templates)
    if not templates:
        raise TemplateError(f"{where}: no templates; give at least one, e.g. 'a photo of a {{}}.'")
    for i, template in enumerate(templates, start=1):
        problem = template_problem(template)
        if problem:
            raise TemplateError(f"{where}, template {i}: {problem}")
    return templates


def read_templates_file(path: str | Path) -> list[str]:
    """The templates of a text file, one a line (blank lines skipped); a bad one is refused
    with its line number."""
    from flyp.data.folders import DataError, read_text

    file = Path(path)
    if not file.is_file():
        raise DataError(f"templates file {file} does not exist; write one template per line")
    lines = read_text(file, "templates file").splitlines()  # UTF-8, or UTF-16/32 with a BOM
    templates = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            problem = template_problem(line.strip())
            if problem:
                raise DataError(f"templates file {file}, line {number}: {problem}")
            templates.append(line.strip())
    if not templates:
        raise DataError(f"templates file {file} is empty; write one template per line")
    return templates
