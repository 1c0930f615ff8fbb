"""A user's own folder of images as a recipe's data, without writing a recipe.

Two layouts are understood:

  DIR/<class>/<image>            one domain: split into train / validation / test
  DIR/<domain>/<class>/<image>   several domains: one is trained on (and split), the others
                                 are out-of-distribution test sets used whole

Both become the ``folders`` benchmark, so the run's saved recipe.yaml repeats the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from flyp.data.folders import IMAGE_SUFFIXES, DataError


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def domains_of(folder: Path) -> list[str] | None:
    """The domain names of a DIR/<domain>/<class>/<image> tree, or None for DIR/<class>/<image>."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"--data {folder} does not exist or is not a folder; pass a folder of images")
    subs = _subfolders(folder)
    if not subs:
        raise DataError(
            f"--data {folder} has no sub-folders; expected DIR/<class>/<image> or "
            "DIR/<domain>/<class>/<image>"
        )
    with_images = [s.name for s in subs if _has_images(s)]
    with_classes = [s.name for s in subs if any(_has_images(c) for c in _subfolders(s))]
    if with_images and with_classes:
        raise DataError(
            f"--data {folder} mixes class folders ({with_images[0]}) and domain folders "
            f"({with_classes[0]}); use DIR/<class>/<image> or DIR/<domain>/<class>/<image>"
        )
    if with_images:
        return None
    if with_classes:
        return [s.name for s in subs]
    raise DataError(
        f"--data {folder} holds no images in DIR/<class>/ or DIR/<domain>/<class>/ folders "
        f"(image files end in {', '.join(sorted(IMAGE_SUFFIXES))})"
    )


def data_overrides(
    folder: str | Path, id_domain: str | None = None, ood_domains: Sequence[str] | None = None
) -> list[str]:
    """Recipe overrides (``key=value``, values as JSON, which YAML reads as it is) that point a
    recipe at ``folder``."""
    folder = Path(folder).expanduser().resolve()
    domains = domains_of(folder)
    if domains is None:  # one domain: the folder itself, seen from its parent
        if id_domain or ood_domains:
            raise DataError(
                f"--data {folder} holds class folders, not domains: drop --id-domain and "
                "--ood-domains (or arrange it as DIR/<domain>/<class>/<image>)"
            )
        root, id_domain, ood_domains = folder.parent, folder.name, []
    else:
        root = folder
        if id_domain is None:
            if len(domains) > 1:
                raise DataError(
                    f"--data {folder} holds the domains {', '.join(domains)}; choose the one to "
                    "train on with --id-domain (the others are OOD test sets unless --ood-domains "
                    "names them)"
                )
            id_domain = domains[0]
        if ood_domains is None:
            ood_domains = [d for d in domains if d != id_domain]
    values = {
        "name": folder.name,
        "data.benchmark": "folders",
        "data.root": str(root),
        "data.id_domain": id_domain,
        "data.ood_domains": list(ood_domains),
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]
