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

from flyp.data.folders import IMAGE_SUFFIXES, LINK_FIX, DataError, image_files
from flyp.paths import link_fault, resolved

LAYOUTS = "DIR/<class>/<image> or DIR/<domain>/<class>/<image>"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder`` (hidden files are not images)."""
    return [p.name for p in image_files(folder) if p.is_file()]


def _some(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def domains_of(folder: Path) -> list[str] | None:
    """The domain names of a DIR/<domain>/<class>/<image> tree, or None for DIR/<class>/<image>.

    Images outside the layout (next to class folders, or directly in DIR) are refused by name:
    no class folder labels them, and leaving them out silently would change the counts."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"--data {folder} does not exist or is not a folder; pass a folder of images"
        )
    subs = _subfolders(folder)
    if not subs:
        raise DataError(f"--data {folder} has no sub-folders; expected {LAYOUTS}")
    images = {s.name: _images(s) for s in subs}
    with_images = [s.name for s in subs if images[s.name]]
    with_classes = [s.name for s in subs if any(_images(c) for c in _subfolders(s))]
    for name in with_images:
        if name in with_classes:
            raise DataError(
                f"--data {folder}: {folder / name} holds image files ({_some(images[name])}) "
                f"next to folders of images; expected {LAYOUTS}: move those images into a "
                "class folder or remove them"
            )
    if with_images and with_classes:
        raise DataError(
            f"--data {folder} mixes class folders (images directly in {with_images[0]}) and "
            f"domain folders (class folders in {with_classes[0]}); use {LAYOUTS}"
        )
    stray = _images(folder)
    if stray and (with_images or with_classes):
        raise DataError(
            f"--data {folder} holds image files directly ({_some(stray)}), outside any class "
            f"folder; expected {LAYOUTS}: move them into a class folder or remove them"
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
    folder: str | Path,
    id_domain: str | None = None,
    ood_domains: Sequence[str] | None = None,
    sets: Sequence[str] = (),
) -> list[str]:
    """Recipe overrides (``key=value``, values as JSON, which YAML reads as it is) that point a
    recipe at ``folder``: a folder of images, a Hugging Face dataset or WebDataset shards
    (``sets``: the run's --set overrides, for data.domain_column)."""
    why = link_fault(Path(folder).expanduser())
    if why:
        raise DataError(f"--data {folder} is {why}; {LINK_FIX}, or pass a folder of images")
    records = _record_overrides(folder, id_domain, ood_domains, sets)
    if records is not None:
        return records
    folder = resolved(folder)
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
            # every domain is taken: one whose link leads nowhere would drop out in silence
            for path in sorted(folder.iterdir()):
                why = None if path.name.startswith(".") else link_fault(path)
                if why:
                    raise DataError(
                        f"--data {folder}: domain folder {path.name} is {why}; {LINK_FIX}, "
                        "or name the domains to test on with --ood-domains"
                    )
    values = {
        "name": folder.name,
        "data.benchmark": "folders",
        "data.root": str(root),
        "data.id_domain": id_domain,
        "data.ood_domains": list(ood_domains),
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _record_overrides(
    data: str | Path,
    id_domain: str | None,
    ood_domains: Sequence[str] | None,
    sets: Sequence[str],
) -> list[str] | None:
    """The overrides for a Hugging Face dataset (``hf``) or WebDataset shards (``wds``) at
    ``data``, or None when it is neither (a folder of images). Their domains are the dataset's
    splits (or the values of data.domain_column) and the shards' names before their number."""
    from flyp.data import hf, shards

    text = str(data)
    if shards.is_shards(text):
        benchmark = "wds"
        root = text if "{" in text else str(Path(text).expanduser().resolve())
        domains = list(shards.domains_of(root))
    elif hf.is_hf(text):
        benchmark = "hf"
        root = str(Path(text).expanduser().resolve())
        column = None
        for item in sets:
            key, _, value = item.partition("=")
            if key.strip() == "data.domain_column":
                column = None if value.strip() in ("", "null", "~") else value.strip().strip("\"'")
        domains = hf.domains_of(root, column)
    else:
        return None
    if id_domain is None:
        if len(domains) > 1:
            raise DataError(
                f"--data {data} holds the domains {', '.join(domains)}; choose the one to train "
                "on with --id-domain (the others are OOD test sets unless --ood-domains names them)"
            )
        id_domain = domains[0]
    if ood_domains is None:
        ood_domains = [d for d in domains if d != id_domain]
    # the run's name: the shards' folder, or the dataset's folder (or Parquet file)
    named = Path(shards.shard_files(root)[0]).parent if benchmark == "wds" else Path(root)
    values = {
        "name": named.stem or benchmark,
        "data.benchmark": benchmark,
        "data.root": root,
        "data.id_domain": id_domain,
        "data.ood_domains": list(ood_domains),
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]
