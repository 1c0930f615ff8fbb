"""A Hugging Face dataset as a benchmark (``data.benchmark: hf``): a local ``save_to_disk``
folder (Arrow files) or Parquet files (one file, or a folder of them as the Hub stores a
dataset: ``data/train-00000-of-00002.parquet``, or ``<split>/0000.parquet``).

- The image column is the one whose feature is ``Image`` (or ``data.image_column``); the label
  column the one that is a ``ClassLabel`` (or ``data.label_column``, or a column named
  ``label``). Class names come from the ClassLabel, from a column of names (sorted, as the ID
  domain uses them), or from ``data.classes_file``.
- The domains are the splits (``train``, ``test``, ...), or the values of ``data.domain_column``
  (all splits together). The ID domain is split into train / validation / test, seeded and
  stratified; every OOD domain is a test set used whole, as for folders.

Needs the ``hf`` extra (``pip install 'flyp[hf]'``: ``datasets``, with ``pyarrow``), imported
only here. Only labels are read up front; images are read when drawn (:mod:`flyp.data.records`).
"""

from __future__ import annotations

import json
from pathlib import Path

from flyp.data import templates as tpl
from flyp.data.folders import DataError, Sample, class_names_file, near_hint, nfc, read_text
from flyp.data.records import table_record
from flyp.recipe import DataConfig

LABEL_NAMES = ("label", "labels", "class", "cls", "fine_label", "category")
IMAGE_NAMES = ("image", "img", "jpg", "png", "picture")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading a Hugging Face dataset needs the 'datasets' package: pip install 'flyp[hf]'"
        ) from None
    return datasets


def is_hf(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder, a Parquet file or a folder of them."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix == ".parquet"
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    # Parquet files in the folder or under data/ (the Hub's layout); not a search of the whole
    # tree: a folder of images (DIR/<class>/<image>) would be listed to its last file.
    data = path / "data"
    return any(path.glob("*.parquet")) or (data.is_dir() and any(data.rglob("*.parquet")))


def _split_of(file: Path) -> str:
    """The split a Parquet file holds, by the Hub's naming: ``train-00000-of-00002.parquet``
    is 'train'; a file named by a number alone (``train/0000.parquet``) is its folder's."""
    stem = file.stem
    head = stem.split("-", 1)[0]
    return file.parent.name if head.isdigit() else head


def splits_of(root: str | Path) -> tuple[dict[str, list[str]], object]:
    """{split: its data files} in order, and the dataset's ``datasets.Features``."""
    datasets = _datasets()
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"data.root {root} does not exist; point it at a save_to_disk folder or Parquet files"
        )
    if root.is_dir() and (root / "dataset_dict.json").is_file():
        names = json.loads(read_text(root / "dataset_dict.json", "file"))["splits"]
        folders = {name: root / name for name in names}
    elif root.is_dir() and (root / "state.json").is_file():
        folders = {root.name: root}
    else:
        files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
        if not files:
            raise DataError(
                f"{root} holds no Parquet files and is no save_to_disk folder (no "
                "dataset_dict.json or state.json); point data.root at the dataset"
            )
        splits: dict[str, list[str]] = {}
        for file in files:
            splits.setdefault(_split_of(file), []).append(str(file))
        import pyarrow.parquet as pq

        return splits, datasets.Features.from_arrow_schema(pq.read_schema(files[0]))
    splits, features = {}, None
    for name, folder in folders.items():
        state = json.loads(read_text(folder / "state.json", "file"))
        splits[name] = [str(folder / f["filename"]) for f in state["_data_files"]]
        if features is None:
            info = json.loads(read_text(folder / "dataset_info.json", "file"))
            features = datasets.Features.from_dict(info["features"])
    return splits, features


def _pick(features, wanted: str | None, kind: str, names: tuple[str, ...], key: str) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"the dataset has no column '{wanted}'{near_hint(wanted, columns)}; columns: "
                f"{', '.join(columns)}; fix {key}"
            )
        return wanted
    datasets = _datasets()
    typed = {"image": datasets.Image, "label": datasets.ClassLabel}[kind]
    found = [c for c in columns if isinstance(features[c], typed)]
    found += [c for c in columns if c.lower() in names and c not in found]
    if not found:
        raise DataError(
            f"no {kind} column found among {', '.join(columns)}; name it with --set {key}=COLUMN"
        )
    return found[0]


def _column(file: str, column: str) -> list:
    """One column of one data file, read without the others (no image bytes)."""
    if file.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(file, columns=[column]).column(0).to_pylist()
    from flyp.data.records import _arrow_table

    return _arrow_table(file).column(column).to_pylist()


def _rows(splits: dict[str, list[str]], columns: list[str]) -> list[tuple]:
    """(split, file, row, value of each column) of every row."""
    out = []
    for split, files in splits.items():
        for file in files:
            values = [_column(file, c) for c in columns]
            out += [(split, file, i, *v) for i, v in enumerate(zip(*values, strict=True))]
    return out


def domains_of(root: str | Path, domain_column: str | None = None) -> list[str]:
    """The domains a recipe may name: the splits, or the values of ``domain_column``."""
    splits, features = splits_of(root)
    if domain_column is None:
        return list(splits)
    _pick(features, domain_column, "domain", (), "data.domain_column")
    return sorted({str(v) for *_, v in _rows(splits, [domain_column])})


def build_hf(cfg: DataConfig):
    from flyp.data.benchmarks import assemble

    if cfg.root is None:
        raise DataError("data.root is not set; point it at a save_to_disk folder or Parquet files")
    splits, features = splits_of(cfg.root)
    image = _pick(features, cfg.image_column, "image", IMAGE_NAMES, "data.image_column")
    label = _pick(features, cfg.label_column, "label", LABEL_NAMES, "data.label_column")
    wanted = [cfg.id_domain, *cfg.ood_domains]
    if cfg.domain_column is None:
        missing = [d for d in wanted if d not in splits]
        if missing:
            raise DataError(
                f"split '{missing[0]}' is not in {cfg.root}{near_hint(missing[0], list(splits))}; "
                f"splits: {', '.join(splits)}; fix data.id_domain / data.ood_domains (or name a "
                "domain column with data.domain_column)"
            )
        splits = {d: splits[d] for d in dict.fromkeys(wanted)}
        if cfg.stream:  # the ID split's files read only as the run trains (flyp.data.stream)
            classes = _class_names(cfg, label, features[label], None)
            return _build_streamed(cfg, splits, image, label, classes)
        rows = [(split, *rest) for split, *rest in _rows(splits, [label])]
    else:
        _pick(features, cfg.domain_column, "domain", (), "data.domain_column")
        rows = [
            (str(domain), file, i, value)
            for _, file, i, value, domain in _rows(splits, [label, cfg.domain_column])
        ]
        present = sorted({r[0] for r in rows})
        for d in wanted:
            if d not in present:
                raise DataError(
                    f"no row has {cfg.domain_column} '{d}'{near_hint(d, present)}; values: "
                    f"{', '.join(present[:20])}; fix data.id_domain / data.ood_domains"
                )
    classes = _class_names(cfg, label, features[label], rows)
    index = {c: i for i, c in enumerate(classes)}
    domains: dict[str, list[Sample]] = {d: [] for d in dict.fromkeys(wanted)}
    for domain, file, row, value in rows:
        if domain in domains:
            value = _checked(value, file, row, index, classes, cfg.id_domain)
            domains[domain].append(Sample(table_record(file, image, row), value))
    return assemble(cfg, "hf", classes, tpl.SIMPLE, domains)


def _build_streamed(
    cfg: DataConfig, splits: dict[str, list[str]], image: str, label: str, classes: list[str] | None
):
    """``data.benchmark: hf`` with data.stream: the ID split's data files are the shards (whole
    files held out for validation and test, their labels read as for an indexed dataset); an
    epoch is the training files' row counts, read from each file's own metadata (a Parquet
    footer, an Arrow file's header), never a row of them."""
    from flyp.data.benchmarks import assemble
    from flyp.data.stream import FIX_STREAM, StreamSpec, split_shards

    if classes is None:
        raise DataError(
            "data.stream reads the training labels only as it trains, so the class names must "
            "be known first: a ClassLabel label column, or data.classes_file (one name a line, "
            f"in label order), {FIX_STREAM}"
        )
    train, val, test = split_shards(splits[cfg.id_domain], cfg, "files")
    if cfg.train_samples is not None:
        samples, source = cfg.train_samples, "data.train_samples"
    else:
        samples, source = sum(_num_rows(f) for f in train), "the files' row counts"

    def rows(files: list[str], domain: str) -> list[Sample]:
        return table_samples({domain: files}, image, label, classes, cfg.id_domain)[domain]

    domains = {d: rows(splits[d], d) for d in cfg.ood_domains}
    spec = StreamSpec(
        tuple(train), samples, source, tuple(val), tuple(test), tuple(classes), cfg.id_domain,
        image, label,
    )  # fmt: skip
    parts = ([], rows(val, cfg.id_domain), rows(test, cfg.id_domain))
    return assemble(cfg, "hf", classes, tpl.SIMPLE, domains, id_parts=parts, stream=spec)


def _class_names(
    cfg: DataConfig, label: str, feature, rows: list[tuple] | None
) -> list[str] | None:
    """data.classes_file, else the ClassLabel's names, else the ID domain's label names (from
    ``rows``; None where they are not read)."""
    datasets = _datasets()
    if cfg.classes_file:
        return class_names_file(cfg.classes_file)
    if isinstance(feature, datasets.ClassLabel):
        return [nfc(n) for n in feature.names]
    if rows is None:
        return None
    if all(isinstance(r[3], str) for r in rows):
        return sorted({nfc(r[3]) for r in rows if r[0] == cfg.id_domain})
    raise DataError(
        f"label column '{label}' holds numbers with no class names (it is "
        "no ClassLabel); name the classes with --set data.classes_file=FILE (one name per line, "
        "in label order)"
    )


def _checked(value, file: str, row: int, index: dict, classes: list[str], id_domain: str) -> int:
    if isinstance(value, str):
        if nfc(value) not in index:
            raise DataError(
                f"{file}, row {row}: label '{value}' is no class of {id_domain}"
                f"{near_hint(value, classes)}; fix the label (every label must occur in the "
                "ID domain)"
            )
        value = index[nfc(value)]
    if value is None or not 0 <= int(value) < len(classes):
        raise DataError(
            f"{file}, row {row}: label {value} is not one of the {len(classes)} classes; fix "
            "the row or data.classes_file"
        )
    return int(value)


def table_samples(
    splits: dict[str, list[str]], image: str, label: str, classes: list[str], id_domain: str
) -> dict[str, list[Sample]]:
    """{split: a Sample per row} of the given data files (their label column read)."""
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[Sample]] = {d: [] for d in splits}
    for domain, file, row, value in _rows(splits, [label]):
        value = _checked(value, file, row, index, classes, id_domain)
        out[domain].append(Sample(table_record(file, image, row), value))
    return out


def _num_rows(file: str) -> int:
    if file.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    from flyp.data.records import _arrow_table

    return _arrow_table(file).num_rows


def table_images(root: str | Path) -> list[str]:
    """Record paths of every image of a dataset (all splits), for ``flyp predict``."""
    splits, features = splits_of(root)
    image = _pick(features, None, "image", IMAGE_NAMES, "data.image_column")
    return [
        table_record(file, image, row)
        for files in splits.values()
        for file in files
        for row in range(_num_rows(file))
    ]
