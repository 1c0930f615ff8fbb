"""Images stored inside other files: Hugging Face datasets (a ``save_to_disk`` folder of Arrow
files, or Parquet files) and WebDataset ``.tar`` shards.

Such an image has no file of its own. It is named by a *record path*: the file that holds it,
``::``, and where in that file it is::

    /data/shards/train-000.tar::51712+4096       a shard member: its byte offset and size
    /data/cifar/train/data-00000-of-00001.arrow::img:42   an Arrow/Parquet file: column, row

A record path is a string like a file path (a :class:`flyp.data.folders.Sample` carries it), so
the splits, the k-shot and size caps, the decoded-image cache, resume and evaluation treat it as
they treat a file. :func:`open_image` reads its bytes (the loader, the image check and predict
all decode through :func:`flyp.data.folders.decode_rgb`, which calls it).

By default flyp *indexes* (``data.stream`` trains on shards read in sequence instead,
:mod:`flyp.data.stream`): building the benchmark reads the labels (the ``.cls``/``.txt``/
``.json`` members of the shards; the label column of the tables) and where each image lies,
never an image's bytes; images are read and decoded when drawn. Reading stays random access (a
tar member by offset, an Arrow row from a memory map, a Parquet row group kept in a small
cache), so the epoch order, the per-sample seeds and a resumed run are those of a folder.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from functools import lru_cache

SEP = "::"
TAR = ".tar"


def is_record(path: str) -> bool:
    """Whether ``path`` names an image inside another file (a record path)."""
    return SEP in str(path)


def container(path: str) -> str:
    """The file that holds the record ``path`` (the path itself for a plain file)."""
    return str(path).split(SEP, 1)[0]


def tar_record(tar: str, offset: int, size: int) -> str:
    return f"{tar}{SEP}{offset}+{size}"


def table_record(file: str, column: str, row: int) -> str:
    return f"{file}{SEP}{column}:{row}"


def open_image(path: str) -> io.BytesIO:
    """The bytes of the image at record ``path``, as a file object for PIL."""
    file, where = str(path).split(SEP, 1)
    if file.endswith(TAR):
        offset, size = (int(x) for x in where.split("+"))
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard {file} ends before byte {offset + size} (changed since indexed?)")
        return io.BytesIO(data)
    column, row = where.rsplit(":", 1)
    value = _table_cell(file, column, int(row))
    if isinstance(value, dict):  # a datasets Image: {"bytes": ..., "path": ...}
        data, source = value.get("bytes"), value.get("path")
        if data is None and source:
            full = source if os.path.isabs(source) else os.path.join(os.path.dirname(file), source)
            with open(full, "rb") as f:
                return io.BytesIO(f.read())
        value = data
    if not isinstance(value, bytes | bytearray):
        raise OSError(f"column '{column}' row {row} of {file} holds no image bytes")
    return io.BytesIO(bytes(value))


# Per process: memory-mapped Arrow tables, and the last Parquet row groups read (a row group
# holds ~100 images; evaluation reads rows in order, so each group is read once).
_ROW_GROUPS: OrderedDict[tuple[str, str, int], object] = OrderedDict()
ROW_GROUPS_KEPT = 8


@lru_cache(maxsize=64)
def _arrow_table(file: str):
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:  # the random-access file format
        return pa.ipc.open_file(source).read_all()


@lru_cache(maxsize=256)
def _row_group_starts(file: str) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(file).metadata
    starts, total = [], 0
    for i in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(i).num_rows
    return (*starts, total)


def _table_cell(file: str, column: str, row: int):
    if not file.endswith(".parquet"):
        return _arrow_table(file).column(column)[row].as_py()
    import bisect

    import pyarrow.parquet as pq

    starts = _row_group_starts(file)
    group = bisect.bisect_right(starts, row) - 1
    if group < 0 or group >= len(starts) - 1:
        raise OSError(f"{file} has {starts[-1]} rows, not row {row} (changed since indexed?)")
    key = (file, column, group)
    values = _ROW_GROUPS.get(key)
    if values is None:
        values = pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0)
        _ROW_GROUPS[key] = values
        while len(_ROW_GROUPS) > ROW_GROUPS_KEPT:
            _ROW_GROUPS.popitem(last=False)
    else:
        _ROW_GROUPS.move_to_end(key)
    return values[row - starts[group]].as_py()
