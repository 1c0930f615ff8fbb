"""Every input a user points at is accounted for (issue 22, item 2): a symbolic link that leads
nowhere (dangling, or looping) where flyp reads folders (a class folder, a folder nested in a
class folder, a domain folder, the data root, a CSV file) is refused in one line naming the
link and the fix, or, where data.on_bad_image=skip, left out, named on stderr and counted, as a
dangling link to an image file is. Before, such folder links were dropped in silence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fakes import make_domains, tiny_overrides
from flyp.cli import main

CLASSES = ["cat", "dog"]
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "pacs.yaml")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache"))


def data_args(root: Path, *extra: str) -> list[str]:
    pairs = tiny_overrides(root, "data.ood_domains=[art]", *extra)
    return ["data", RECIPE, *[x for pair in pairs for x in ("--set", pair)]]


def refused(args: list[str], capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def total(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("total"))
    return sum(int(v) for v in line.split()[1:])


@pytest.fixture
def root(tmp_path) -> Path:
    return make_domains(tmp_path / "d", ["photo", "art"], CLASSES, per_class=4)


LINKS = {  # where, relative to the root: (link name, its target); what it is, in the message
    "dangling class folder": (
        "art/bird",
        "/nowhere/bird",
        "dangling symbolic link (to /nowhere/bird",
    ),
    "looping class folder": ("art/loop", "loop", "symbolic link that loops"),
    "dangling nested folder": (
        "photo/dog/more",
        "../../gone",
        "dangling symbolic link (to ../../gone",
    ),
    "looping nested folder": ("photo/cat/a", "b", "symbolic link that loops"),
}


@pytest.mark.parametrize("case", sorted(LINKS))
def test_a_folder_link_that_leads_nowhere_is_refused_naming_it(case, root, capsys):
    name, target, what = LINKS[case]
    os.symlink(target, root / name)
    if case == "looping nested folder":
        os.symlink("a", root / "photo" / "cat" / "b")
    line = refused(data_args(root), capsys)
    assert f"{root / name} is a {what}" in line, line
    assert "remove it, or set data.on_bad_image=skip to leave it out" in line


@pytest.mark.parametrize("case", sorted(LINKS))
def test_under_skip_such_a_link_is_named_and_counted_and_the_images_kept(case, root, capsys):
    name, target, what = LINKS[case]
    os.symlink(target, root / name)
    skipped = 1
    if case == "looping nested folder":
        os.symlink("a", root / "photo" / "cat" / "b")
        skipped = 2
    assert main(data_args(root, "data.on_bad_image=skip")) == 0
    captured = capsys.readouterr()
    assert f"data: skipped {root / name} (a {what}" in captured.err
    assert f"{skipped} links that lead nowhere left out (data.on_bad_image=skip)" in captured.out
    assert total(captured.out) == 16  # every real image, none lost with the link


def test_a_domain_whose_folder_link_leads_nowhere_is_refused_even_under_skip(root, capsys):
    """A whole test set is no bad image: leaving it out would change the OOD mean."""
    os.symlink("/nowhere/sketch", root / "sketch")
    for policy in ("error", "skip"):
        line = refused(
            data_args(root, f"data.on_bad_image={policy}", "data.ood_domains=[art, sketch]"), capsys
        )
        assert f"domain folder {root / 'sketch'} is a dangling symbolic link" in line
        assert "drop the domain from data.id_domain / data.ood_domains" in line
    assert main(data_args(root)) == 0  # a broken link the recipe does not name is not read


def test_own_data_refuses_a_domain_link_that_leads_nowhere_unless_domains_are_named(
    tmp_path, capsys
):
    root = make_domains(tmp_path / "own", ["photo", "art"], CLASSES, per_class=10)
    os.symlink("sketch", root / "sketch")  # loops
    args = ["data", "--data", str(root), "--id-domain", "photo"]
    line = refused(args, capsys)
    assert "domain folder sketch is a symbolic link that loops" in line
    assert "--ood-domains" in line
    assert main([*args, "--ood-domains", "art"]) == 0


def test_a_class_folder_missing_as_a_broken_link_says_so_under_skip(root, capsys):
    """Skipped in one domain, the class is missing there (art then covers one class, which is
    refused): the refusal says why the class is missing."""
    (root / "art" / "dog").rename(root / "dog_moved")
    os.symlink("/nowhere/dog", root / "art" / "dog")
    line = refused(data_args(root, "data.on_bad_image=skip"), capsys)
    assert "art has only one class folder ('cat'; 'dog' is a dangling symbolic link" in line


def test_a_dangling_image_link_gives_its_reason(root, capsys):
    os.symlink("/nowhere/x.png", root / "art" / "dog" / "x.png")
    line = refused(data_args(root), capsys)
    assert "x.png (a dangling symbolic link (to /nowhere/x.png, which does not exist))" in line
    assert main(data_args(root, "data.on_bad_image=skip")) == 0
    assert "unreadable images left out" in capsys.readouterr().out


def test_a_dangling_data_root_or_csv_file_is_named_as_a_link(tmp_path, capsys):
    os.symlink("/nowhere/data", tmp_path / "data")
    line = refused(data_args(tmp_path / "data"), capsys)
    assert f"data root {tmp_path / 'data'} is a dangling symbolic link (to /nowhere/data" in line
    (tmp_path / "csvs").mkdir()
    os.symlink("/nowhere/a.csv", tmp_path / "csvs" / "a.csv")
    args = data_args(
        tmp_path / "csvs", "data.benchmark=csv", "data.id_domain=a", "data.ood_domains=[]"
    )
    line = refused(args, capsys)
    assert f"CSV file {tmp_path / 'csvs' / 'a.csv'} is a dangling symbolic link" in line


# --- a fresh sweep (issue 22, item 5): links and folders where flyp reads or writes a file ----


def _sets(root: Path, *extra: str) -> list[str]:
    return [x for o in tiny_overrides(root, "data.ood_domains=[art]", *extra) for x in ("--set", o)]


def _zeroshot_run(root: Path, tmp_path: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    run = tmp_path / "run"
    args = _sets(root, "train.method=zeroshot")
    assert main(["finetune", str(recipe), *args, "--out", str(run)]) == 0
    return run


def test_run_files_and_outputs_that_are_folders_or_links_to_nowhere_are_one_line(
    root, tmp_path, capsys
):
    """Each of these was a traceback (IsADirectoryError, or resolve()'s RuntimeError on a
    loop) or a bare "[Errno 17] File exists" before."""
    run = _zeroshot_run(root, tmp_path)
    capsys.readouterr()
    os.symlink("loop", tmp_path / "loop")
    os.symlink("/nowhere/out", tmp_path / "dangling")
    for verb in (["report", str(run)], ["evaluate", str(run)]):
        for out, what in (("loop", "a symbolic link that loops"), ("dangling", "a dangling")):
            line = refused([*verb, "--out", str(tmp_path / out)], capsys)
            assert f"--out {tmp_path / out} is {what}" in line and "remove the link" in line
    finetune = ["finetune", str(tmp_path / "r.yaml"), *_sets(root, "train.method=zeroshot")]
    line = refused([*finetune, "--out", str(tmp_path / "dangling")], capsys)
    assert f"{tmp_path / 'dangling'} is a dangling symbolic link (to /nowhere/out" in line
    line = refused(["data", "--data", str(tmp_path / "loop")], capsys)
    assert f"--data {tmp_path / 'loop'} is a symbolic link that loops" in line
    metrics = (run / "metrics.json").read_bytes()
    (run / "metrics.json").unlink()
    os.symlink("/nowhere/m.json", run / "metrics.json")  # was: evaluated, as if unfinished
    line = refused(["evaluate", str(run)], capsys)
    assert f"{run / 'metrics.json'} is a dangling symbolic link (to /nowhere/m.json" in line
    line = refused(["finetune", "--resume", str(run)], capsys)
    assert f"{run / 'metrics.json'} is a dangling symbolic link" in line
    (run / "metrics.json").unlink()
    os.symlink("/nowhere/state.pt", run / "state.pt")  # was: restarted from step 0 in silence
    line = refused(["finetune", "--resume", str(run)], capsys)
    assert f"{run / 'state.pt'} is a dangling symbolic link" in line and "restore it" in line
    (run / "state.pt").unlink()
    (run / "metrics.json").write_bytes(metrics)
    (run / "wise.json").mkdir()
    line = refused(["report", str(run), "--out", str(tmp_path / "rep")], capsys)
    assert f"{run / 'wise.json'} is a folder where flyp reads or writes a file" in line
    (run / "metrics.json").unlink()
    (run / "metrics.json").mkdir()
    line = refused(["report", str(run), "--out", str(tmp_path / "rep")], capsys)
    assert f"{run / 'metrics.json'} is a folder where flyp reads or writes a file" in line


def test_a_data_root_that_loops_and_a_csv_file_that_is_a_folder_are_named(tmp_path, capsys):
    os.symlink("loop", tmp_path / "loop")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    args = [x for o in tiny_overrides(tmp_path / "loop") for x in ("--set", o)]
    line = refused(["finetune", str(recipe), *args, "--out", str(tmp_path / "run")], capsys)
    assert str(tmp_path / "loop") in line and "symbolic link that loops" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "csvs" / "a.csv").mkdir(parents=True)
    csv = ["data.benchmark=csv", "data.id_domain=a", "data.ood_domains=[]"]
    line = refused(data_args(tmp_path / "csvs", *csv), capsys)
    assert f"CSV file {tmp_path / 'csvs' / 'a.csv'} is a folder, not a CSV file" in line


def test_the_paper_benchmarks_refuse_a_class_folder_link_to_nowhere(tmp_path):
    """Caltech101 (and every builder reading class folders: ImageNet's shifts, ObjectNet): a
    class folder that is a broken link is refused naming it, not left out in silence."""
    from flyp.data.benchmarks import build_benchmark
    from flyp.data.folders import DataError
    from test_paper_benchmarks import _cfg, fake_caltech101

    root = fake_caltech101(tmp_path)
    os.symlink("/nowhere/zebra", root / "caltech101" / "101_ObjectCategories" / "zebra")
    with pytest.raises(DataError, match=r"class folder .*zebra is a dangling symbolic link"):
        build_benchmark(_cfg("caltech101", root, val_fraction=0.2, test_fraction=0.2))


def test_the_paper_benchmarks_hand_an_image_link_to_nowhere_to_the_image_check(tmp_path):
    """An image named like one but linking nowhere is listed (not dropped), so the image check
    names it: refused, or skipped and counted under data.on_bad_image=skip."""
    from flyp.data.paper import images_in

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    os.symlink("/nowhere/b.jpg", folder / "b.jpg")
    (folder / "sub.jpg").mkdir()  # a folder named like an image is none
    assert [p.name for p in images_in(folder)] == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("name", ["recipe.yaml", "model.safetensors", "metrics.json"])
def test_a_run_file_that_is_a_link_to_nowhere_is_named_by_every_verb_that_reads_it(
    name, root, tmp_path, capsys
):
    """Before: "RUN has no recipe.yaml, so it is not a flyp run", "is the run finished?", or
    (report, a dangling recipe.yaml) a report made without its recipe check."""
    run = _zeroshot_run(root, tmp_path)
    capsys.readouterr()
    (run / name).unlink()
    os.symlink(f"/nowhere/{name}", run / name)
    readers = {
        "recipe.yaml": ["report", "export", "evaluate", "wise"],
        "model.safetensors": ["predict", "export", "evaluate"],
        "metrics.json": ["report", "export", "wise"],
    }
    verbs = {
        "report": ["report", str(run), "--out", str(tmp_path / "rep")],
        "predict": ["predict", str(run), str(root / "art"), "--out", str(tmp_path / "p.csv")],
        "export": ["export", str(run), "--format", "flyp", "--out", str(tmp_path / "ex")],
        "evaluate": ["evaluate", str(run)],
        "wise": ["wise", str(run)],
    }
    for verb in readers[name]:
        line = refused(verbs[verb], capsys)
        assert f"{run / name} is a dangling symbolic link (to /nowhere/{name}" in line, verb
        assert "restore the file it points to" in line
    assert not (tmp_path / "rep").exists() and not (tmp_path / "ex").exists()


def test_flyp_data_counts_its_templates_in_words(root, capsys):
    """'1 template', not '1 templates'; and the seven of the pacs set."""
    assert main(data_args(root, "data.templates=simple")) == 0
    assert ", 1 template, " in capsys.readouterr().out
    assert main(data_args(root, "data.templates=pacs")) == 0
    assert ", 7 templates, " in capsys.readouterr().out
