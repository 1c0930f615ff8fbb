"""The machine's answers are one line each (issue 22, item 7).

A read-only file system, a full disk (as the OS, safetensors and torch's zip writer each report
it: only the first is an OSError), a class folder whose name is not UTF-8, and a UTF-8 recipe
read under LC_ALL=C. The writers' own errors are reproduced with the exact types and messages
they gave on a full 64 kB tmpfs here (safetensors 0.x, torch 2.14).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from fakes import error_lines, make_domains, tiny_overrides
from flyp import checkpoint
from flyp.cli import main

ROOT = Path(__file__).resolve().parents[1]
# what torch.save raised when the disk filled under its zip writer
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _argv(tree: Path, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    sets = tiny_overrides(tree, "train.epochs=1", *extra)
    return ["finetune", str(recipe), "--out", str(out), *[f"--set={s}" for s in sets]]


def test_a_read_only_output_folder_is_one_line(fake_pacs, tmp_path, monkeypatch, capsys):
    """EROFS (not a PermissionError): as a read-only mount answers, for every file written."""
    out = tmp_path / "ro" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(_argv(fake_pacs, tmp_path, out)) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: cannot write {out}: the file system is read-only; choose an --out on "
                   "a writable disk"]  # fmt: skip


@pytest.mark.parametrize(
    "writer, error",
    [
        ("safetensors", SafetensorError(SAFETENSORS_FULL)),
        ("torch", RuntimeError(TORCH_FULL)),
    ],
)
def test_a_full_disk_under_either_writer_is_named_with_the_file_being_written(
    writer, error, tmp_path, monkeypatch
):
    """torch's zip writer says "unexpected pos": a failed write where the disk has no room
    left is the full disk, named as such; the temporary file is removed."""

    def failing(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")  # what the writer got out before the disk filled
        raise error

    monkeypatch.setattr(checkpoint, "save_file" if writer == "safetensors" else "_torch_save", failing)
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda folder: 4096)
    target = tmp_path / ("w.safetensors" if writer == "safetensors" else "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match=f"no space left on device while writing {target}"):
        if writer == "safetensors":
            checkpoint.save_weights(torch.nn.Linear(2, 2), target)
        else:
            checkpoint.save_state({"step": 1}, target)
    assert list(tmp_path.iterdir()) == []


def test_a_torch_write_error_with_room_left_keeps_its_own_words(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(checkpoint, "_torch_save", failing)
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda folder: 10**12)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write .*state.pt \(\[enforce"):
        checkpoint.save_state({"step": 1}, tmp_path / "state.pt")


def test_export_onto_a_full_disk_names_the_export_not_the_run(tmp_path, monkeypatch, capsys):
    """shutil.copy2's ENOSPC carries the source as its filename: the message names the target."""
    from flyp import export

    tree = make_domains(tmp_path / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=6)
    run = tmp_path / "run"
    assert main(_argv(tree, tmp_path, run)) == 0
    out = tmp_path / "exported"

    def copy2(src, dst, **kwargs):
        err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        err.filename, err.filename2 = str(src), str(dst)
        raise err

    monkeypatch.setattr(export.shutil, "copy2", copy2)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "flyp", "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "no space left on the device" in err[0], err
    assert str(out) in err[0] and str(run / "model.safetensors") not in err[0]


def test_a_class_folder_named_in_another_encoding_is_one_line(tmp_path, capsys):
    tree = make_domains(tmp_path / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=6)
    for domain in ("photo", "art", "sketch"):
        os.rename(tree / domain / "dog", os.fsencode(tree / domain) + b"/d\xe9g")  # Latin-1 "dég"
    assert main(_argv(tree, tmp_path, tmp_path / "run")) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "is not valid UTF-8" in err[0] and "d\\udce9g" not in err[0], err
    assert "rename it" in err[0]


def test_a_utf8_recipe_under_lc_all_c_is_read(tmp_path):
    """LC_ALL=C makes Python's default encoding ASCII: a recipe (YAML is UTF-8) is read as
    UTF-8 whatever the locale."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: café\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "HF_HUB_OFFLINE": "1"}
    code = f"from flyp.recipe import load_recipe; print(load_recipe({str(recipe)!r}).name == 'caf\\xe9')"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_an_image_too_elongated_to_resize_is_refused_or_skipped_not_blown_up(tmp_path, capsys):
    """A 957-byte 1 x 300,000 PNG: resized for the model it became 224 x 67 million pixels.
    It is a bad image: named in one line, or skipped and counted under data.on_bad_image."""
    from PIL import Image

    tree = make_domains(tmp_path / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=6)
    strip = tree / "photo" / "dog" / "strip.png"
    Image.new("RGB", (300_000, 1), (200, 10, 10)).save(strip)
    assert strip.stat().st_size < 5_000
    assert main(_argv(tree, tmp_path, tmp_path / "run")) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(strip) in err[0] and "aspect ratio over 20:1" in err[0], err
    assert main(_argv(tree, tmp_path, tmp_path / "run", "data.on_bad_image=skip")) == 0
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert '"skipped_images": 1' in metrics


# --- one image is one file, wherever it is linked from (issue 22, item 2) -----------------------


def _links_case(tmp_path: Path, how: str) -> tuple[Path, Path]:
    tree = make_domains(tmp_path / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=6)
    if how == "class folder":  # horse's folder is dog's: identical images under two labels
        shutil.rmtree(tree / "photo" / "horse")
        (tree / "photo" / "horse").symlink_to(tree / "photo" / "dog", target_is_directory=True)
        return tree, tree / "photo" / "horse"
    if how == "domain":  # the OOD domain is the ID domain: OOD "measured" on training images
        shutil.rmtree(tree / "sketch")
        (tree / "sketch").symlink_to(tree / "photo", target_is_directory=True)
        return tree, tree / "sketch"
    # a hard link: one photo of a dog also filed as an art image
    target = tree / "art" / "dog" / "linked.png"
    os.link(tree / "photo" / "dog" / "000.png", target)
    return tree, target


@pytest.mark.parametrize("how", ["class folder", "domain", "hard link"])
def test_a_linked_image_is_one_file_and_is_refused_naming_both_paths(how, tmp_path, capsys):
    tree, linked = _links_case(tmp_path, how)
    assert main(_argv(tree, tmp_path, tmp_path / "run")) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "are one file (a symbolic or hard link)" in err[0], err
    assert str(linked) in err[0]  # the linked path is named (beside the file it points at)
    assert not (tmp_path / "run").exists()
