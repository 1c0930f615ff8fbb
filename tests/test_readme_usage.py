"""The README's "Using it" block runs top to bottom, and what it shows printed comes from
benchmarks/readme_usage.py (issue 16): the README, the script and the script's last record
(docs/readme_usage.json) must agree, so none of them can change without rerunning `make usage`.
No training here: the commands are read, parsed with flyp's own CLI parser and compared."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from flyp.cli import build_parser
from flyp.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RERUN = "rerun `make usage` (benchmarks/readme_usage.py) and commit README.md with its JSON"


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "readme_usage", ROOT / "benchmarks" / "readme_usage.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


usage = _load_script()


def _record() -> dict:
    return json.loads(usage.RECORD.read_text(encoding="utf-8"))


def _readme() -> str:
    return usage.README.read_text(encoding="utf-8")


def _fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def _joined(lines: list[str]) -> list[str]:
    """Shell lines with their ``\\`` continuations joined into one command each."""
    commands, current = [], ""
    for line in lines:
        current += line
        if current.endswith("\\"):
            current = current[:-1]
        else:
            commands.append(current)
            current = ""
    return commands


def _words(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "), comments=True)


def _walkthrough() -> str:
    text = _readme()
    start, end = usage.readme_region(text)
    return text[start:end]


def _more_commands() -> list[str]:
    """The commands of the README's bash block of longer runs, after the walkthrough."""
    text = _readme()
    section = text[usage.readme_region(text)[1] :].split("\n## ", 1)[0]
    blocks = _fenced(section, "bash")
    assert blocks, "README.md's 'Using it' has no ```bash block of further commands"
    return [c for c in _joined(blocks[0].splitlines()) if c.strip()]


def test_readme_walkthrough_is_what_the_script_last_wrote():
    """The README between the usage markers is the script's rendering of its last record:
    a hand edit of a command or of an output shown there fails here."""
    assert _walkthrough() == usage.render(_record()), f"README.md's walkthrough drifted: {RERUN}"


def test_script_steps_are_the_ones_its_record_ran():
    """The script's commands and Python example are those its record ran, in the same order:
    a changed script that was not rerun fails here."""
    record = _record()
    assert [(s["command"], s["status"]) for s in record["steps"]] == [
        (s.command, s.status) for s in usage.STEPS
    ], f"benchmarks/readme_usage.py's STEPS changed since it last ran: {RERUN}"
    assert record["python"]["code"] == usage.PYTHON, f"the Python example changed: {RERUN}"


def test_readme_lists_the_scripts_commands_in_the_same_order():
    """Read from the README itself: its `$ ` commands are the script's STEPS, one for one and
    in order, and its Python block is the script's example."""
    walkthrough = _walkthrough()
    console = _fenced(walkthrough, "console")
    assert len(console) == 1, "the walkthrough has one ```console block"
    lines = console[0].splitlines()
    shown, i = [], 0
    while i < len(lines):  # a command: `$ ` and its continuation lines
        if lines[i].startswith("$ "):
            command = [lines[i][2:]]
            while command[-1].endswith("\\"):
                i += 1
                command.append(lines[i])
            shown.append(_words("\n".join(command)))
        i += 1
    assert shown == [_words(s.command) for s in usage.STEPS]
    python = _fenced(walkthrough, "python")
    assert python == [usage.PYTHON.rstrip() + "\n"]


def test_recorded_outputs_are_results_or_the_one_line_refusal_shown():
    """Each step printed what it is shown for: a refusal exactly one `error:` line, the
    others no error or traceback; and nothing volatile (scratch paths) was left in."""
    record = _record()
    for step in record["steps"]:
        out = step["output"]
        assert "flyp-usage-" not in out and "/tmp/" not in out, step["command"]
        if step["status"]:
            assert len(out.splitlines()) == 1 and out.startswith("error: "), step["command"]
        else:
            assert out.strip() and "error:" not in out and "Traceback" not in out, step["command"]
    assert record["python"]["output"].strip() and "Traceback" not in record["python"]["output"]


def _made_and_read(words: list[str]) -> tuple[set[str], set[str]]:
    """(run folders a flyp command makes, run folders or files it reads), parsed with flyp's
    own parser so an option the CLI lacks fails here."""
    assert words[0] == "flyp", f"not a flyp command: {words}"
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(words)}` is not a valid flyp command line (see the stderr)")
    made, read = set(), set()
    if args.command in ("finetune", "compare", "sweep") and not getattr(args, "resume", None):
        if args.out:
            made.add(args.out)
        else:
            assert args.recipe, f"`{shlex.join(words)}`: with --data, say where with --out"
            recipe = load_recipe(ROOT / args.recipe, args.set)
            made.add(
                {
                    "finetune": f"runs/{recipe.name}-{recipe.train.method}-s{recipe.train.seed}",
                    "compare": f"runs/{recipe.name}-compare",
                    "sweep": f"runs/{recipe.name}-{recipe.train.method}-sweep",
                }[args.command]
            )
    elif args.command == "finetune":
        read.add(args.resume)
    elif args.command in ("evaluate", "predict"):
        read.add(args.target)
    elif args.command in ("wise", "export"):
        read.add(args.run_dir)
        if args.command == "export":
            made.add(args.out)
    elif args.command == "report":
        read.update(args.run_dirs)
    return made, read


def _check_order(commands: list[list[str]], python: str = "") -> None:
    made: set[str] = set()
    for words in commands:
        new, read = _made_and_read(words)
        for path in read:
            run = path.removesuffix("/model.safetensors").rstrip("/")
            # a compare's --out holds its runs (OUT/flyp-s0)
            inside = any(run.startswith(f"{m}/") for m in made)
            assert run in made or inside, (
                f"`{shlex.join(words)}` reads {path}, which no line above makes"
            )
        made |= {p.rstrip("/") for p in new}
    for path in re.findall(r"load_classifier\(\"([^\"]+)\"", python):
        assert path.removesuffix("/model.safetensors") in made, f"the Python example reads {path}"


def test_walkthrough_runs_in_order_on_a_fresh_clone():
    """Each walkthrough command is a valid flyp command line, and every run it reads (predict,
    export, the Python example's load_classifier) is made by a command above it."""
    _check_order([_words(s.command) for s in usage.STEPS], usage.PYTHON)
    assert "load_classifier" in usage.PYTHON


def test_readme_further_commands_run_in_order():
    """The README's block of longer runs also runs top to bottom: each line parses with flyp's
    parser and each run directory it reads (evaluate, wise, predict, --resume, report) is made
    by a line above it, under --out or the default name."""
    commands = [_words(c) for c in _more_commands()]
    assert len(commands) >= 10
    _check_order(commands)


def test_order_check_catches_a_run_read_before_it_is_made():
    """The order check itself fails on a run read before the line that makes it."""
    with pytest.raises(AssertionError, match="no line above makes"):
        _check_order(
            [
                ["flyp", "evaluate", "runs/ft"],
                ["flyp", "finetune", "recipes/pacs.yaml", "--out", "runs/ft"],
            ]
        )
    with pytest.raises(pytest.fail.Exception, match="not a valid flyp command"):
        _check_order([["flyp", "predict", "runs/ft", "x.jpg", "--topk", "3"]])


def test_mask_leaves_out_what_changes_between_runs(tmp_path):
    """Progress lines (time of day first, the image check's counts), the scratch folder, the
    image check's time and its cache file name are masked; results are kept as they are."""
    text = (
        f"05:49:33 training 2 epochs of 7 steps\nval 94.3\nimage check: 3840/9991 decoded\n"
        f"image check: 9991 images in 8.4 s (9991 decoded with 2 threads, 0 known good from "
        f"{tmp_path}/cache/image-check/2740189f4cd11bcc.json); 0 bad\n"
        f"exported runs/flyp to {tmp_path}/clone/exported\n"
    )
    assert usage.mask(text, tmp_path) == (
        "val 94.3\nimage check: 9991 images in … s (9991 decoded with 2 threads, 0 known good "
        "from ~/.cache/flyp/image-check/….json); 0 bad\nexported runs/flyp to exported\n"
    )


def test_a_step_that_fails_leaves_readme_and_record_as_they_were(tmp_path, monkeypatch, capsys):
    """A walkthrough step ending with another exit status than the one it is shown with stops
    the script with one line naming the step; README.md and the JSON are not touched."""
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{usage.BEGIN}\nold\n{usage.END}\nrest\n", encoding="utf-8")
    record = tmp_path / "readme_usage.json"
    (tmp_path / "pacs").mkdir()
    monkeypatch.setattr(usage, "README", readme)
    steps = [usage.Step("echo fine"), usage.Step("exit 3")]
    walk = usage.Walk("usage", steps, "print(1)", record, usage.BEGIN, usage.END)
    monkeypatch.setitem(usage.WALKS, "usage", walk)
    monkeypatch.setenv("FLYP_PACS_ROOT", str(tmp_path / "pacs"))
    argv = ["readme_usage.py", "--walk", "usage", "--keep", str(tmp_path / "scratch")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        usage.main()
    assert "the README step `exit 3` ended with exit status 3, not 0" in str(stop.value)
    assert readme.read_text(encoding="utf-8").count("old") == 1 and not record.exists()


def test_render_patches_only_between_the_markers(tmp_path, monkeypatch):
    """--render rewrites the README between the markers from the record and nothing else; a
    README without the markers is refused by name."""
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{usage.BEGIN}\nold\n{usage.END}\nrest\n", encoding="utf-8")
    monkeypatch.setattr(usage, "README", readme)
    usage.patch_readme(_record())
    text = readme.read_text(encoding="utf-8")
    assert text == f"intro\n{usage.render(_record())}\nrest\n"
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the markers"):
        usage.patch_readme(_record())


def _own_record() -> dict:
    return json.loads(usage.OWN.record.read_text(encoding="utf-8"))


def test_own_data_walkthrough_is_what_the_script_last_wrote():
    """The README's own-data walkthrough (Parquet and shards, --quick over three seeds, a
    streamed run) is the script's rendering of its last record, and the record ran the script's
    commands: neither a hand edit nor an unrerun change of the script passes."""
    text = _readme()
    start, end = usage.readme_region(text, usage.OWN)
    assert text[start:end] == usage.render(_own_record(), usage.OWN), (
        "README.md's own-data walkthrough drifted: rerun benchmarks/readme_usage.py --walk "
        "own-data and commit README.md with docs/readme_own_data.json"
    )
    assert [(s["command"], s["status"]) for s in _own_record()["steps"]] == [
        (s.command, s.status) for s in usage.OWN_STEPS
    ], "benchmarks/readme_usage.py's OWN_STEPS changed since it last ran: rerun it"


def test_own_data_walkthrough_runs_in_order_and_shows_its_progress():
    """Its flyp commands parse with flyp's parser and read only runs made above them; the
    compare's real output holds the plan, the estimate and step k/N lines with an ETA, and
    the report; nothing failed."""
    flyp_lines = []
    for step in usage.OWN_STEPS:
        words = _words(step.command)
        if words[0] == "flyp":
            flyp_lines.append(words[: words.index("|")] if "|" in words else words)
    assert len(flyp_lines) >= 5
    _check_order(flyp_lines)
    outputs = {s["command"].split()[1]: s["output"] for s in _own_record()["steps"]}
    compare = outputs["compare"]
    assert re.search(r"plan: \d+ runs .*training steps", compare)
    assert re.search(r"estimate: \d+:\d\d:\d\d in all", compare)
    assert re.search(r"step \d+/\d+, \d+/\d+ steps in all, ETA \d+:\d\d:\d\d", compare)
    assert "| flyp |" in compare and "Traceback" not in compare
    assert "training set streamed from" in outputs["finetune"]
    for step in _own_record()["steps"]:
        assert "error:" not in step["output"] and "/tmp/" not in step["output"], step["command"]
