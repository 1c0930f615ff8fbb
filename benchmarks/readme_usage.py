"""Run the README's "Using it" walkthrough and write what it prints into README.md.

The walkthrough is STEPS and PYTHON below: shell commands run top to bottom as a user would run
them on a fresh clone (each creates what the next uses), then the Python example, which loads
the run they trained. They run in a scratch folder laid out like a clone next to ``../shared``
(the PACS data linked in, a fresh image-check cache), with the seeds of the recipe defaults, so
a rerun prints the same. What they print, with the parts that change from run to run masked
(timings, cache file names), goes to docs/readme_usage.json and, rendered, between the
``<!-- usage:begin ... -->`` and ``<!-- usage:end -->`` markers of README.md.
tests/test_readme_usage.py fails when README.md, this script and the JSON disagree, so the
walkthrough cannot change without rerunning this::

    make usage                                             # run it all (a few minutes), patch README
    .venv/bin/python benchmarks/readme_usage.py --render   # re-patch README from the JSON only

A second walkthrough, OWN_STEPS, is a new user's own data as it ships: PACS photo and sketch
written as a Parquet dataset and as WebDataset shards, checked, compared with `--quick` over three
seeds (about ten minutes on 2 quiet cores: the timed `--quick`), FLYP trained on the shards
streamed (`data.stream`), and predicted from a shard. Its
progress lines are kept with their times of day: they are what a piped log shows (the plan, the
estimate, step k/N with its ETA). Its record is docs/readme_own_data.json, between its own
markers in the README's "Your data as a Hugging Face dataset or WebDataset shards"::

    .venv/bin/python benchmarks/readme_usage.py --walk own-data   # only that one (~10 min)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECORD = ROOT / "docs" / "readme_usage.json"
BEGIN = "<!-- usage:begin: written by benchmarks/readme_usage.py (make usage); edit the script -->"
END = "<!-- usage:end -->"
OWN_RECORD = ROOT / "docs" / "readme_own_data.json"
OWN_BEGIN = "<!-- own-data:begin: written by benchmarks/readme_usage.py --walk own-data; edit the script -->"
OWN_END = "<!-- own-data:end -->"
PACS = "../shared/data/pacs"


@dataclass(frozen=True)
class Step:
    """One shell command as the README shows it (a long one continued with `` \\``), and the
    exit status it must end with: 0, or 2 for a refusal the walkthrough shows on purpose."""

    command: str
    status: int = 0


# The README's own quick settings: 224 training images, 2 epochs, at most 70 images per
# evaluation set, 160 px (about two minutes of training on 2 CPU cores).
QUICK = (
    "--set model.image_size=160 --set data.max_train=224 --set data.max_eval=70 \\\n"
    "    --set train.epochs=2"
)

STEPS = [
    Step(f"flyp data --data {PACS} --id-domain photo"),
    Step(f"flyp finetune --data {PACS} --id-domain photo --out runs/flyp \\\n    {QUICK}"),
    Step(
        f"flyp predict runs/flyp {PACS}/art_painting/dog/pic_001.jpg \\\n"
        f"    {PACS}/cartoon/elephant/pic_001.jpg {PACS}/sketch/giraffe/7361.png \\\n"
        f"    {PACS}/photo/guitar/063_0001.jpg --top-k 3 --out runs/predictions.csv"
    ),
    Step(
        f"flyp predict runs/flyp {PACS}/art_painting/dog/pic_001.jpg \\\n"
        f'    {PACS}/photo/guitar/063_0001.jpg --classes "dog,cat,violin,car" --top-k 2'
    ),
    Step("flyp export runs/flyp --format open_clip --out runs/exported", status=2),
    Step("flyp export runs/flyp --format flyp --out runs/exported"),
]

OWN_DATA = "mypacs"
OWN_STEPS = [
    Step(
        f"python benchmarks/make_record_data.py {PACS} {OWN_DATA} --domains photo sketch \\\n"
        "    --per-shard 100 --shuffle"
    ),
    Step(f"ls {OWN_DATA} {OWN_DATA}/parquet/data && head -c 120 {OWN_DATA}/shards/sizes.json"),
    Step(f"flyp data --data {OWN_DATA}/shards --id-domain photo"),
    Step(f"flyp data --data {OWN_DATA}/parquet --set data.domain_column=domain --id-domain photo"),
    Step(
        f"flyp compare --data {OWN_DATA}/parquet --set data.domain_column=domain --id-domain photo \\\n"
        "    --quick --seeds 0 1 2 --out runs/mypacs"
    ),
    Step(
        f"flyp finetune --data {OWN_DATA}/shards --id-domain photo --set data.stream=true \\\n"
        "    --set model.image_size=128 --set train.epochs=2 --set data.max_eval=300 "
        "--out runs/streamed"
    ),
    Step(
        f"flyp predict runs/mypacs/flyp-s0 {OWN_DATA}/shards/sketch-000.tar --top-k 2 \\\n"
        "    --out runs/sketch_preds.csv | sed -n '1,4p;$p'"
    ),
]

PYTHON = """\
import flyp

clf = flyp.load_classifier("runs/flyp/model.safetensors")  # the file alone: no recipe, no data
guitar = "../shared/data/pacs/photo/guitar/063_0001.jpg"
top = clf.predict([guitar], top_k=3)[0]  # per image: the top classes and their probabilities
print([(name, round(p, 3)) for name, p in top])
new = clf.with_classes(["banjo", "violin", "guitar"])  # new class names, finetuned text tower
print([(name, round(p, 3)) for name, p in new.predict([guitar], top_k=3)[0]])
image, text = clf.encode_image([guitar]), clf.encode_text(["a photo of a guitar."])
print(image.shape, text.shape, f"cosine {(image @ text.T).item():.3f}")  # unit-length features
"""


PROGRESS = re.compile(r"\d\d:\d\d:\d\d |image check: \d+/\d+ decoded$")


@dataclass(frozen=True)
class Walk:
    """One walkthrough: its commands, its Python example (or none), where its record and its
    README region are, and whether its timed progress lines are shown."""

    name: str
    steps: list[Step]
    python: str
    record: Path
    begin: str
    end: str
    progress: bool = False


USAGE = Walk("usage", STEPS, PYTHON, RECORD, BEGIN, END)
OWN = Walk("own-data", OWN_STEPS, "", OWN_RECORD, OWN_BEGIN, OWN_END, progress=True)
WALKS = {w.name: w for w in (USAGE, OWN)}


def mask(text: str, scratch: Path, progress: bool = False) -> str:
    """``text`` without what changes from run to run: the progress lines (on stderr: those
    starting with the time of day, a bar on a terminal, and the image check's counts every few
    seconds) unless ``progress``, the scratch folder, the image check's time and its cache file
    name (a hash of the data's absolute path)."""
    lines = text.splitlines(keepends=True)
    if not progress:
        lines = [line for line in lines if not PROGRESS.match(line)]
    text = "".join(lines)
    text = text.replace(str(scratch / "cache"), "~/.cache/flyp")
    text = text.replace(str(scratch / "clone") + "/", "").replace(str(scratch), "…")
    text = re.sub(r"(image check: \d+ images in )[\d.]+ s", r"\1… s", text)
    return re.sub(r"image-check/[0-9a-f]+\.json", "image-check/….json", text)


def _scratch_clone(scratch: Path) -> tuple[Path, dict[str, str]]:
    """A folder laid out like a fresh clone beside ``../shared/data/pacs`` (its benchmarks
    folder linked in), and the environment the walkthrough runs in there."""
    pacs = Path(os.environ.get("FLYP_PACS_ROOT") or ROOT.parent / "shared" / "data" / "pacs")
    if not pacs.is_dir():
        sys.exit(f"error: PACS is not at {pacs}; set FLYP_PACS_ROOT to its folder")
    clone = scratch / "clone"
    clone.mkdir()
    (clone / "benchmarks").symlink_to(ROOT / "benchmarks")
    (scratch / "shared" / "data").mkdir(parents=True)
    (scratch / "shared" / "data" / "pacs").symlink_to(pacs.resolve())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "FLYP_CACHE": str(scratch / "cache"),  # a fresh image check: the same counts each time
        "FLYP_CHECK_WORKERS": "2",
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleaved as on a terminal
    }
    return clone, env


def _run(argv: list[str], clone: Path, env: dict[str, str], shown: str, status: int) -> str:
    """Run one step; its stdout and stderr together, or exit naming the step that failed."""
    done = subprocess.run(
        argv, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if done.returncode != status:
        tail = "\n".join(done.stdout.splitlines()[-15:])
        sys.exit(
            f"{tail}\nerror: the README step `{shown.splitlines()[0]}` ended with exit status "
            f"{done.returncode}, not {status}; README.md was left as it was"
        )
    return done.stdout


def run_all(scratch: Path, walk: Walk = USAGE) -> dict:
    """Run the walk's steps then its Python example in a scratch clone; the record written to
    its JSON."""
    clone, env = _scratch_clone(scratch)
    start = time.time()
    steps = []
    for step in walk.steps:
        print(f"$ {step.command}", flush=True)
        ran = _run(["bash", "-c", step.command], clone, env, step.command, step.status)
        out = mask(ran, scratch, walk.progress)
        print(out, end="", flush=True)
        steps.append({"command": step.command, "status": step.status, "output": out})
    record: dict = {"steps": steps}
    if walk.python:
        (clone / "example.py").write_text(walk.python)
        ran = _run([sys.executable, "example.py"], clone, env, "python example", 0)
        out = mask(ran, scratch)
        print(out, end="")
        record["python"] = {"code": walk.python, "output": out}
    record["seconds"] = round(time.time() - start)
    return record


def render(record: dict, walk: Walk = USAGE) -> str:
    """The README's walkthrough, markers included, from a record of run_all."""
    transcript = "\n\n".join(f"$ {s['command']}\n{s['output'].rstrip()}" for s in record["steps"])
    text = f"{walk.begin}\n```console\n{transcript}\n```\n"
    if "python" in record:
        python = record["python"]
        text += (
            f"\n```python\n{python['code'].rstrip()}\n```\n\n"
            f"prints\n\n```text\n{python['output'].rstrip()}\n```\n"
        )
    return text + walk.end


def readme_region(text: str, walk: Walk = USAGE) -> tuple[int, int]:
    """Where the walkthrough is in the README's text: (start of its begin marker, end of its end
    marker)."""
    start, end = text.find(walk.begin), text.find(walk.end)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {walk.begin!r} ... {walk.end!r}")
    return start, end + len(walk.end)


def patch_readme(record: dict, walk: Walk = USAGE) -> None:
    """Replace the README's walkthrough with ``record`` rendered, atomically."""
    from flyp.checkpoint import atomic_write_text

    text = README.read_text(encoding="utf-8")
    start, end = readme_region(text, walk)
    atomic_write_text(README, text[:start] + render(record, walk) + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--render", action="store_true", help="only re-patch README.md from the saved JSON"
    )
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (new) and keep it")
    parser.add_argument(
        "--walk", choices=[*WALKS, "all"], default="all", help="which walkthrough to run"
    )
    args = parser.parse_args()
    from flyp.checkpoint import atomic_write_text

    walks = list(WALKS.values()) if args.walk == "all" else [WALKS[args.walk]]
    for walk in walks:
        if args.render:
            record = json.loads(walk.record.read_text(encoding="utf-8"))
        else:
            keep = Path(args.keep) / walk.name if args.keep else None
            scratch = Path(keep or tempfile.mkdtemp(prefix="flyp-usage-")).resolve()
            if keep:
                scratch.mkdir(parents=True)
            try:
                record = run_all(scratch, walk)
            finally:
                if not keep:
                    shutil.rmtree(scratch, ignore_errors=True)
            text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
            atomic_write_text(walk.record, text)
            print(
                f"ran the {walk.name} walkthrough in {record['seconds']} s; wrote "
                f"{walk.record.relative_to(ROOT)}"
            )
        patch_readme(record, walk)
        print(f"patched {README.relative_to(ROOT)} between the {walk.name} markers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
