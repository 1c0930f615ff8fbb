"""WebDataset ``.tar`` shards as a benchmark (``data.benchmark: wds``).

``data.root`` is a folder of shards, one shard, or a brace pattern (``/data/train-{000..099}.tar``,
expanded as WebDataset expands it). The shards of one domain share a name before their number:
``clean-000.tar``, ``clean-001.tar`` are the domain 'clean', ``corrupt-000.tar`` the domain
'corrupt'. Each sample is the members sharing a key (the member's path up to the first dot of its
name, WebDataset's rule): one image (``.jpg``, ``.png``, ...) and its label in ``.cls`` (the class
index), ``.txt`` (the class name) or ``.json`` (``{"label": index or name}``). Class names come
from ``data.classes_file``, else ``classes.txt`` beside the shards, else the ``.txt``/``.json``
names (sorted, as the ID domain uses them).

Needs the ``wds`` extra (``pip install 'flyp[wds]'``: ``webdataset``, whose brace expansion this
uses), imported only here. Indexing reads every tar header and the small label members, never
an image's bytes; images are read by offset when drawn (:mod:`flyp.data.records`). With
``data.stream`` the ID domain's training shards are not indexed but read in sequence as the run
trains (:mod:`flyp.data.stream`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import tarfile
from pathlib import Path

from flyp.data import templates as tpl
from flyp.data.folders import DataError, Sample, near_hint, nfc
from flyp.data.records import tar_record
from flyp.recipe import DataConfig

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}
LABEL_EXTENSIONS = ("cls", "txt", "json")
NUMBERED = re.compile(r"^(?P<domain>.+?)[-_.]?\d+$")


def _expand(pattern: str) -> list[str]:
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise DataError(
                "reading WebDataset shards needs the 'webdataset' package: "
                "pip install 'flyp[wds]'"
            ) from None
        return list(braceexpand(pattern))
    return list(expand_urls(pattern))


def is_shards(path: str | Path) -> bool:
    """Whether ``path`` is a ``.tar`` shard, a brace pattern of them, or a folder of them."""
    text = str(path)
    if text.endswith(".tar"):
        return True
    folder = Path(text).expanduser()
    return folder.is_dir() and any(p.suffix == ".tar" for p in folder.iterdir())


def shard_files(root: str | Path) -> list[str]:
    """The shards ``root`` names, each checked to exist."""
    text = str(Path(str(root)).expanduser()) if "{" not in str(root) else str(root)
    folder = Path(text)
    if folder.is_dir():
        files = sorted(str(p) for p in folder.iterdir() if p.suffix == ".tar")
        if not files:
            raise DataError(f"{folder} holds no .tar shards; point data.root at the shards")
        return files
    files = _expand(os.path.expanduser(text)) if "{" in text else [text]
    for file in files:
        if not os.path.isfile(file):
            raise DataError(
                f"shard {file} does not exist; fix data.root (a folder of .tar shards, a shard, "
                "or a brace pattern like train-{000..099}.tar)"
            )
    return files


def domain_of(shard: str) -> str:
    """'clean' for clean-000.tar (or clean_000, clean000); the name itself if it has no number."""
    stem = Path(shard).name[: -len(".tar")]
    match = NUMBERED.match(stem)
    return match["domain"] if match and match["domain"] else stem


def domains_of(root: str | Path) -> dict[str, list[str]]:
    """{domain: its shards}, domains in the order their first shard sorts."""
    out: dict[str, list[str]] = {}
    for file in sorted(shard_files(root)):
        out.setdefault(domain_of(file), []).append(file)
    return out


def _split(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, by WebDataset's rule: the key is the path up to
    the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label(ext: str, data: bytes, where: str):
    text = data.decode("utf-8").strip()
    if ext == "json":
        value = json.loads(text)
        if isinstance(value, dict):
            for key in ("label", "cls", "class"):
                if key in value:
                    return value[key]
            raise DataError(f"{where}: the .json has no 'label' key; write {{\"label\": ...}}")
        return value
    if ext == "cls":
        if not text.lstrip("-").isdigit():
            raise DataError(f"{where}: .cls holds '{text[:20]}', not a class index")
        return int(text)
    return nfc(text)


def index_shard(shard: str, labels: bool = True) -> list[tuple[str, str, object]]:
    """(key, record path of its image, its label) of every sample of one shard, in tar order;
    only tar headers and label members are read."""
    samples: dict[str, list] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split(member.name)
                entry = samples.setdefault(key, [None, None, None])
                if ext in IMAGE_EXTENSIONS and entry[0] is None:
                    entry[0] = tar_record(shard, member.offset_data, member.size)
                elif labels and ext in LABEL_EXTENSIONS:
                    rank = LABEL_EXTENSIONS.index(ext)
                    if entry[2] is None or rank < entry[2]:
                        data = tar.extractfile(member).read()
                        entry[1] = _label(ext, data, f"{shard} member {member.name}")
                        entry[2] = rank
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"cannot read shard {shard} ({err}); replace it or leave it out") from None
    out = []
    for key, (image, label, _) in samples.items():
        if image is None:
            continue  # a key without an image (a caption or metadata alone) is no sample
        if labels and label is None:
            raise DataError(
                f"{shard}: sample '{key}' has an image but no label (.cls, .txt or .json); add "
                "one or remove the sample"
            )
        out.append((key, image, label))
    return out


def named_classes(cfg: DataConfig, shards: list[str]) -> list[str] | None:
    """The class names of data.classes_file, else of classes.txt beside the shards, else None."""
    from flyp.data.folders import class_names_file

    if cfg.classes_file:
        return class_names_file(cfg.classes_file)
    beside = Path(shards[0]).parent / "classes.txt"
    if beside.is_file():
        return class_names_file(str(beside))
    return None


def _class_names(cfg: DataConfig, shards: list[str], id_labels: list) -> list[str]:
    names = named_classes(cfg, shards)
    if names is not None:
        return names
    beside = Path(shards[0]).parent / "classes.txt"
    if all(isinstance(v, str) for v in id_labels):
        return sorted(set(id_labels))
    raise DataError(
        f"the shards label by class index (.cls) and no class names were found: write "
        f"{beside} (one name per line, in index order) or set data.classes_file"
    )


def found_domains(cfg: DataConfig) -> dict[str, list[str]]:
    """{domain: its shards} of data.root, each domain the recipe names checked to be there."""
    if cfg.root is None:
        raise DataError("data.root is not set; point it at .tar shards (a folder or a pattern)")
    found = domains_of(cfg.root)
    wanted = list(dict.fromkeys([cfg.id_domain, *cfg.ood_domains]))
    for d in wanted:
        if d not in found:
            raise DataError(
                f"domain '{d}' has no shards in {cfg.root}{near_hint(d, list(found))}; domains "
                f"found: {', '.join(found)} (a domain is the name before a shard's number); fix "
                "data.id_domain / data.ood_domains"
            )
    return found


def build_wds(cfg: DataConfig):
    """Every shard indexed (data.stream: flyp.data.stream.build_shards instead)."""
    from flyp.data.benchmarks import assemble

    found = found_domains(cfg)
    wanted = list(dict.fromkeys([cfg.id_domain, *cfg.ood_domains]))
    indexed = {d: [s for shard in found[d] for s in index_shard(shard)] for d in wanted}
    all_shards = [shard for d in wanted for shard in found[d]]
    classes = _class_names(cfg, all_shards, [s[2] for s in indexed[cfg.id_domain]])
    domains = {
        d: [
            Sample(image, class_index(label, key, container_name(image), classes, cfg.id_domain))
            for key, image, label in samples
        ]
        for d, samples in indexed.items()
    }
    return assemble(cfg, "wds", classes, tpl.SIMPLE, domains)


def class_index(label, key: str, where: str, classes: list[str], id_domain: str) -> int:
    """A sample's label (a class index, or one of the names ``classes``) as a checked index."""
    if isinstance(label, str):
        index = _index_of(tuple(classes))
        if label not in index:
            raise DataError(
                f"sample '{key}' ({where}) has label '{label}', no class "
                f"of {id_domain}{near_hint(label, classes)}; fix the label"
            )
        label = index[label]
    if not 0 <= int(label) < len(classes):
        raise DataError(
            f"sample '{key}' ({where}) has class index {label}, outside "
            f"0..{len(classes) - 1} of the {len(classes)} class names; fix it or the names"
        )
    return int(label)


@functools.lru_cache(maxsize=8)
def _index_of(classes: tuple[str, ...]) -> dict[str, int]:
    return {c: i for i, c in enumerate(classes)}


def container_name(record: str) -> str:
    from flyp.data.records import container

    return container(record)


def shard_images(root: str | Path) -> list[str]:
    """Record paths of every image of the shards, for ``flyp predict``."""
    return [image for shard in shard_files(root) for _, image, _ in index_shard(shard, False)]
