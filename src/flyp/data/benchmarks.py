"""A benchmark is the splits of one experiment: ID train / validation / test, OOD test sets,
class names, templates and the headline metric.

Builders read a :class:`flyp.recipe.DataConfig`. The ID domain is split with a seeded,
stratified split; every other listed domain is an OOD test set used whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flyp.data import templates as tpl
from flyp.data.folders import (
    LINK_FIX,
    DataError,
    Sample,
    check_domain_names,
    check_same_classes,
    covered_classes,
    list_domain,
    name_key,
    near_hint,
    nfc,
    read_csv,
    require_dir,
    subfolders,
)
from flyp.data.lazy import lazy_builder
from flyp.data.sets import Benchmark, finish
from flyp.data.splits import stratified_split
from flyp.paths import link_fault, resolved
from flyp.recipe import DataConfig


def pacs_default_root() -> Path:
    """Where PACS is looked for when data.root is null: $FLYP_PACS_ROOT if set, else
    ../shared/data/pacs next to the checkout. Nothing machine-specific: anywhere else, set one."""
    env = os.environ.get("FLYP_PACS_ROOT")
    if env:
        return resolved(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "pacs"


def absolute_roots(cfg: DataConfig) -> DataConfig:
    """``cfg`` with data.root and data.roots as the absolute paths they resolve to here and now
    (a null PACS root: the default location it stands for). A run stores these: a relative
    root re-read from another folder would point at other data."""
    import dataclasses

    root = cfg.root
    if root is not None:
        root = str(resolved(root))
    elif cfg.benchmark == "pacs":
        root = str(resolved(pacs_default_root()))
    roots = {name: str(resolved(path)) for name, path in cfg.roots.items()}
    return dataclasses.replace(cfg, root=root, roots=roots)


def _assemble(
    cfg: DataConfig,
    name: str,
    classes: list[str],
    templates: list[str],
    domains: dict[str, list[Sample]],
    class_subsets: dict[str, list[int]] | None = None,
    skipped_links: dict[str, str] | None = None,
    publisher_names: bool = False,
    id_parts: tuple[list[Sample], list[Sample], list[Sample]] | None = None,
    stream=None,
) -> Benchmark:
    """Split the ID domain (seeded, stratified); the OOD domains are test sets used whole, each
    one covering a subset of the classes (``class_subsets``) scored on its own classes.

    ``publisher_names``: the domains are named by the dataset's publisher (a Hugging Face
    dataset's splits 'train' and 'test', shards 'train-000.tar'), so a domain named like one of
    flyp's own sets is shown as '<name> split' ('test split') rather than refused.

    ``id_parts``: the ID domain's train / validation / test, split already (a streamed
    training set, :mod:`flyp.data.stream`, whose ``stream`` spec the Benchmark carries)."""
    if publisher_names:
        import dataclasses

        from flyp.data.folders import reserved_names

        reserved = reserved_names(cfg.id_domain)
        reserved.pop(name_key(f"{cfg.id_domain} (ID)"))

        def shown(domain: str) -> str:
            return f"{domain} split" if name_key(domain) in reserved else domain

        cfg = dataclasses.replace(
            cfg, id_domain=shown(cfg.id_domain), ood_domains=[shown(d) for d in cfg.ood_domains]
        )
        domains = {shown(d): v for d, v in domains.items()}
        class_subsets = {shown(d): v for d, v in (class_subsets or {}).items()}
    check_domain_names([cfg.id_domain, *cfg.ood_domains])  # not 'val', 'train', 'test'
    if id_parts is None:
        train, val, test = stratified_split(
            domains[cfg.id_domain], [cfg.val_fraction, cfg.test_fraction], cfg.split_seed
        )
    else:
        train, val, test = id_parts
    tests = {cfg.id_domain: test} | {d: domains[d] for d in cfg.ood_domains}
    display = [c.replace("_", " ") for c in classes]
    return finish(
        cfg, name, display, templates, train, val, tests, cfg.id_domain,
        class_subsets=class_subsets, skipped_links=skipped_links, stream=stream,
    )


def assemble(
    cfg: DataConfig, name: str, classes: list[str], templates: list[str], domains, **split
):
    """The benchmark of a dataset whose domains its publisher named (flyp.data.hf, .shards);
    ``split``: _assemble's id_parts and stream, for a streamed training set."""
    return _assemble(cfg, name, classes, templates, domains, publisher_names=True, **split)


def _domain_folders(root: Path, cfg: DataConfig) -> dict[str, str]:
    """{recipe domain name: its folder under root}, matched in Unicode NFC; a name with no
    folder is an error suggesting the nearest one."""
    available = subfolders(root)
    folders = {}
    broken = {nfc(p.name): why for p in root.iterdir() if (why := link_fault(p))}
    for domain in [cfg.id_domain, *cfg.ood_domains]:
        if nfc(domain) in broken:  # a whole set is no bad image: never skipped
            raise DataError(
                f"domain folder {root / domain} is {broken[nfc(domain)]}; {LINK_FIX}, or drop "
                "the domain from data.id_domain / data.ood_domains"
            )
        if nfc(domain) not in available:
            near = near_hint(nfc(domain), list(available))
            prefix = [a for a in available if a.startswith(nfc(domain)[:3])]
            hint = near or (f" (did you mean '{prefix[0]}'?)" if prefix else "")
            raise DataError(
                f"domain '{domain}' is not in {root}{hint}; domains found: "
                f"{', '.join(available.values())}; fix data.id_domain / data.ood_domains"
            )
        folders[domain] = available[nfc(domain)]
    return folders


def build_folders(
    cfg: DataConfig,
    name: str = "folders",
    templates: list[str] | None = None,
    default_root: Path | None = None,
) -> Benchmark:
    """Any <root>/<domain>/<class>/<image> tree."""
    root_text = cfg.root or (str(default_root) if default_root else None)
    if root_text is None:
        raise DataError("data.root is not set; point it at a folder of <domain>/<class>/<image>")
    root = require_dir(
        Path(root_text), "data root", "set data.root to the dataset folder (--set data.root=/path)"
    )
    folders = _domain_folders(root, cfg)
    links: dict[str, str] | None = {} if cfg.on_bad_image == "skip" else None
    classes = check_same_classes(root, list(folders.values()), links)
    domains = {d: list_domain(root, folder, classes, links) for d, folder in folders.items()}
    subsets = {d: covered_classes(root, folder, classes) for d, folder in folders.items()}
    subsets = {d: covered for d, covered in subsets.items() if covered is not None}
    return _assemble(cfg, name, classes, templates or tpl.SIMPLE, domains, subsets, links)


def build_pacs(cfg: DataConfig) -> Benchmark:
    default = pacs_default_root()
    if cfg.root is None and not default.is_dir():
        where = (
            f"FLYP_PACS_ROOT={os.environ['FLYP_PACS_ROOT']} is not a folder"
            if os.environ.get("FLYP_PACS_ROOT")
            else f"data.root is null and {default} (../shared/data/pacs next to the checkout) "
            "does not exist"
        )
        raise DataError(
            f"PACS not found: {where}; set data.root=/path/to/pacs (--set) or FLYP_PACS_ROOT"
        )
    return build_folders(cfg, name="pacs", templates=tpl.PACS, default_root=default)


def build_csv(cfg: DataConfig) -> Benchmark:
    """<root>/<domain>.csv files with columns path,label (class names); one CSV per domain."""
    if cfg.root is None:
        raise DataError("data.root is not set; point it at a folder holding <domain>.csv files")
    root = require_dir(Path(cfg.root), "data root", "set data.root to the folder of CSV files")
    rows = {d: read_csv(root / f"{d}.csv") for d in [cfg.id_domain, *cfg.ood_domains]}
    classes = sorted({label for _, label in rows[cfg.id_domain]})
    if len(classes) < 2:
        raise DataError(
            f"{root / (cfg.id_domain + '.csv')} uses only one label ('{classes[0]}'); a classifier "
            "needs at least two classes: add rows of other classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    domains = {}
    for domain, domain_rows in rows.items():
        unknown = sorted({lab for _, lab in domain_rows} - set(index))
        if unknown:
            raise DataError(
                f"{root / (domain + '.csv')} has label '{unknown[0]}' that {cfg.id_domain}.csv "
                f"never uses{near_hint(unknown[0], classes)}; fix the label (every label must "
                "occur in the ID domain)"
            )
        domains[domain] = [Sample(p, index[lab]) for p, lab in domain_rows]
    # an OOD domain using some of the labels is scored on those (as folders are)
    subsets = {d: sorted({s.label for s in samples}) for d, samples in domains.items()}
    subsets = {d: c for d, c in subsets.items() if d != cfg.id_domain and len(c) < len(classes)}
    for domain, covered in subsets.items():
        if len(covered) == 1:
            raise DataError(
                f"{root / (domain + '.csv')} uses only one label ('{classes[covered[0]]}'): "
                f"scored on its own classes, every prediction would be right; add rows of more "
                f"of {cfg.id_domain}.csv's labels or leave the domain out"
            )
    return _assemble(cfg, "csv", classes, tpl.SIMPLE, domains, subsets)


BENCHMARKS: dict[str, Callable[[DataConfig], Benchmark]] = {
    "pacs": build_pacs,
    "folders": build_folders,
    "csv": build_csv,
    "hf": lazy_builder("flyp.data.hf", "build_hf"),
    "wds": lazy_builder("flyp.data.stream", "build_shards"),  # indexed, or data.stream
    "imagenet": lazy_builder("flyp.data.imagenet", "build_imagenet"),
    "iwildcam": lazy_builder("flyp.data.wilds", "build_iwildcam"),
    "fmow": lazy_builder("flyp.data.wilds", "build_fmow"),
    "caltech101": lazy_builder("flyp.data.transfer", "build_caltech101"),
    "stanford_cars": lazy_builder("flyp.data.transfer", "build_stanford_cars"),
    "flowers102": lazy_builder("flyp.data.transfer", "build_flowers102"),
    "pcam": lazy_builder("flyp.data.transfer", "build_pcam"),
    "sst2": lazy_builder("flyp.data.transfer", "build_sst2"),
}


def build_benchmark(cfg: DataConfig) -> Benchmark:
    if cfg.benchmark not in BENCHMARKS:
        raise DataError(
            f"unknown benchmark '{cfg.benchmark}'; known: {', '.join(sorted(BENCHMARKS))}"
        )
    return BENCHMARKS[cfg.benchmark](cfg)
