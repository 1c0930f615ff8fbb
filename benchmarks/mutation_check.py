"""Mutation check: plant one realistic bug at a time in src/flyp and see whether the tests catch it.

Each mutant is one exact source snippet replaced by a slightly wrong one (the kind of slip a
developer makes: a dropped term, a flipped comparison, a forgotten restore). For every mutant the
package, tests and recipes are copied to a fresh temporary directory, the one replacement is
applied there, and ``pytest tests -x`` runs with that copy first on PYTHONPATH (checked: the
copy is what ``import flyp`` finds). A mutant is caught when the suite fails (or times out).

  .venv/bin/python benchmarks/mutation_check.py                   # every mutant, one at a time
  .venv/bin/python benchmarks/mutation_check.py --only L01 T05    # some of them
  .venv/bin/python benchmarks/mutation_check.py --list           # ids, areas, files
  .venv/bin/python benchmarks/mutation_check.py --focus --jobs 2  # area files + test_mutants.py
  .venv/bin/python benchmarks/mutation_check.py --baseline       # deselect tests failing unmutated
  .venv/bin/python benchmarks/mutation_check.py --focus --mutants-last   # rate with and without

The whole suite takes ~35 s on a quiet machine; a caught mutant usually stops much earlier
because the test files of its area run first. A snippet that no
longer matches the source exactly once stops the run before anything is mutated: update it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the suite reads: the README walkthrough test also reads README.md, docs/ and the script
COPIED = ("src", "tests", "recipes", "pyproject.toml", "README.md", "docs", "benchmarks")


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to src/flyp
    snippet: str
    replacement: str
    area: str


M = Mutant
# fmt: off
MUTANTS: list[Mutant] = [
    # --- losses -----------------------------------------------------------------------------
    M("L01", "losses.py",
      "        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2",
      "        return F.cross_entropy(logits, target)", "losses"),
    M("L02", "losses.py",
      "(F.cross_entropy(masked, target) + F.cross_entropy(masked.t(), target)) / 2",
      "(F.cross_entropy(masked, target) + F.cross_entropy(masked, target)) / 2", "losses"),
    M("L03", "losses.py", "masked_fill(same & ~eye,", "masked_fill(same,", "losses"),
    M("L04", "losses.py",
      "target = same.float() / same.float().sum(dim=1, keepdim=True)",
      "target = same.float()", "losses"),
    M("L05", "losses.py",
      "(soft_cross_entropy(logits, target) + soft_cross_entropy(logits.t(), target)) / 2",
      "(soft_cross_entropy(logits, target) + soft_cross_entropy(logits, target)) / 2", "losses"),
    M("L06", "losses.py",
      "F.log_softmax(logits, dim=1)).sum(dim=1).mean()",
      "F.log_softmax(logits, dim=0)).sum(dim=1).mean()", "losses"),
    M("L07", "losses.py",
      "signs = 2 * positive.to(logits.dtype) - 1",
      "signs = 1 - 2 * positive.to(logits.dtype)", "losses"),
    M("L08", "losses.py",
      "return -(F.logsigmoid(signs * logits) * counted).sum() / n",
      "return -(F.logsigmoid(signs * logits) * counted).mean()", "losses"),
    M("L09", "losses.py",
      "text_features.t() + logit_bias", "text_features.t() - logit_bias", "losses"),
    M("L10", "losses.py",
      "    logits = logit_scale * image_features @ text_features.t()\n    n = logits.shape[0]\n    if",
      "    logits = image_features @ text_features.t()\n    n = logits.shape[0]\n    if", "losses"),
    M("L13", "losses.py",
      'positive = eye | same if collisions == "soft" else eye', "positive = eye", "losses"),
    M("L14", "losses.py",
      'else eye | ~same', "else ~same", "losses"),
    M("L11", "methods.py",
      "    scale = model.logit_scale.exp()\n",
      "    scale = model.logit_scale\n", "losses"),
    M("L12", "methods.py",
      "    image_features = F.normalize(image_features, dim=-1)\n",
      "", "losses"),
    # --- methods ----------------------------------------------------------------------------
    M("M01", "methods.py",
      'p.requires_grad_(method.objective in ("contrastive", "ce-both"))',
      'p.requires_grad_(method.objective == "contrastive")', "methods"),
    M("M02", "methods.py",
      "return self.model.logit_scale.float().exp() * features @ self.text_head.float().t()",
      "return features @ self.text_head.float().t()", "methods"),
    M("M03", "methods.py",
      "head.weight.copy_(weights * model.logit_scale.exp().detach())",
      "head.weight.copy_(weights)", "methods"),
    M("M04", "methods.py",
      "            head.bias.zero_()\n", "", "methods"),
    M("M05", "methods.py",
      "loss = loss + ctx.l2sp_weight * l2sp_penalty(model, ctx.theta0)",
      "loss = loss + l2sp_penalty(model, ctx.theta0)", "methods"),
    M("M06", "methods.py",
      "F.cross_entropy(model.logit_scale.float().exp() * image @ text.t(), labels)",
      "F.cross_entropy(image @ text.t(), labels)", "methods"),
    M("M07", "methods.py",
      "g = torch.Generator().manual_seed(step)", "g = torch.Generator().manual_seed(0)", "methods"),
    M("M08", "methods.py",
      "ctx.templates[s % n].format(ctx.class_names[y])",
      "ctx.templates[y % n].format(ctx.class_names[y])", "methods"),
    M("M09", "methods.py",
      'return name in ("logit_scale", "logit_bias")', 'return name == "logit_scale"', "methods"),
    M("M10", "methods.py",
      "(n, _), g in zip(named, grads, strict=True) if g is not None}",
      "(n, _), g in zip(named, grads, strict=True) if g is None}", "methods"),
    M("M11", "methods.py",
      "            p.requires_grad_(method.train_text or name in image_names)",
      "            p.requires_grad_(method.train_text or name not in image_names)", "methods"),
    # --- heads ------------------------------------------------------------------------------
    M("H01", "heads.py",
      "chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))",
      "chunks.append(model.encode_text(tokens).float())", "heads"),
    M("H02", "heads.py",
      "weights = F.normalize(per_caption.mean(dim=1), dim=-1)",
      "weights = per_caption.mean(dim=1)", "heads"),
    M("H03", "heads.py",
      "captions = [t.format(c) for c in class_names for t in templates]",
      "captions = [t.format(c) for t in templates for c in class_names]", "heads"),
    # --- ensembling -------------------------------------------------------------------------
    M("E01", "ensemble.py",
      "torch.lerp(zs.float(), ft.float(), alpha)", "torch.lerp(ft.float(), zs.float(), alpha)",
      "ensemble"),
    M("E02", "ensemble.py",
      "if ft.is_floating_point() else ft.clone()", "if ft.is_floating_point() else zs.clone()",
      "ensemble"),
    M("E03", "ensemble.py", ".mean(0).to(first.dtype)", ".sum(0).to(first.dtype)", "ensemble"),
    M("E04", "ensemble.py",
      "key=lambda i: -scores[i])", "key=lambda i: scores[i])", "ensemble"),
    M("E05", "ensemble.py", "if score >= best:", "if score > best:", "ensemble"),
    M("E06", "ensemble.py",
      "            kept.append(i)\n            best = score\n",
      "            kept.append(i)\n", "ensemble"),
    M("E07", "compare.py",
      'best = max(points, key=lambda p: (p["val"], -abs(p["alpha"] - 0.5)))',
      'best = max(points, key=lambda p: (p["id"], -abs(p["alpha"] - 0.5)))', "ensemble"),
    M("E08", "compare.py",
      'best = max(points, key=lambda p: (p["val"], -abs(p["alpha"] - 0.5)))',
      'best = max(points, key=lambda p: (p["val"], p["alpha"]))', "ensemble"),
    M("E09", "compare.py",
      "    _reset(exp, pretrained)\n    method = get_method(method_name)",
      "    method = get_method(method_name)", "ensemble"),
    M("E10", "compare.py",
      "known.setdefault(1.0, metrics[\"sets\"])", "known.setdefault(0.0, metrics[\"sets\"])",
      "ensemble"),
    # --- probe ------------------------------------------------------------------------------
    M("P01", "probe.py", "scores[c] > scores[best.C]", "scores[c] >= scores[best.C]", "probe"),
    M("P02", "probe.py",
      "coef = torch.cat([torch.zeros_like(coef), coef])",
      "coef = torch.cat([coef, torch.zeros_like(coef)])", "probe"),
    M("P03", "probe.py", "weight[classes] = coef", "weight[: len(classes)] = coef", "probe"),
    M("P04", "probe.py",
      "bias = torch.full((num_classes,), -1e4)", "bias = torch.zeros(num_classes)", "probe"),
    M("P05", "probe.py",
      "feats.append(F.normalize(model.encode_image(images).float(), dim=-1))",
      "feats.append(model.encode_image(images).float())", "probe"),
    # --- training loop: schedule, optimizer groups, selection, counters ----------------------
    M("T01", "train.py",
      "        self.optimizer.step()\n        self.scheduler.step()\n",
      "        self.scheduler.step()\n        self.optimizer.step()\n", "schedule"),
    M("T02", "train.py",
      "scale_lr = cfg.lr if cfg.logit_scale_lr is None else cfg.logit_scale_lr",
      "scale_lr = cfg.lr", "optimizer groups"),
    M("T03", "train.py", "elif p.ndim >= 2:", "elif p.ndim > 2:", "optimizer groups"),
    M("T04", "train.py",
      "warmup_cosine(cfg.warmup_steps, total_steps)",
      "warmup_cosine(cfg.warmup_steps, steps_per_epoch)", "schedule"),
    M("T05", "train.py",
      "return (step + 1) / warmup", "return step / warmup", "schedule"),
    M("T06", "train.py",
      "        if cfg.grad_clip:\n            torch.nn.utils.clip_grad_norm_(",
      "        if cfg.grad_clip and self.step > 0:\n            torch.nn.utils.clip_grad_norm_(",
      "optimizer groups"),
    M("T07", "train.py",
      'if best["epoch"] == 0 or val > best["val"]:', 'if best["epoch"] == 0 or val >= best["val"]:',
      "selection"),
    M("T08", "train.py",
      'self.step, self.best = state["step"], state["best"]', 'self.step = state["step"]', "resume"),
    M("T09", "train.py",
      '        self.optimizer.load_state_dict(state["optimizer"])\n', "", "resume"),
    M("T10", "train.py",
      '        self.scheduler.load_state_dict(state["scheduler"])\n', "", "resume"),
    M("T11", "train.py", '        set_rng_state(state["rng"], self.env.device)\n', "", "resume"),
    M("T12", "rundir.py",
      'json.loads(line).get("step", 0) <= step', 'json.loads(line).get("step", 0) < step',
      "resume"),
    M("T13", "train.py",
      '            truncate_log(self.run_dir / "log.jsonl", self.step)\n', "            pass\n",
      "resume"),
    M("T14", "train.py",
      'self.train_seconds, self.images_seen = state["train_seconds"], state["images_seen"]',
      'self.train_seconds = state["train_seconds"]', "resume"),
    M("T15", "train.py", "images_seen += len(labels)", "images_seen += 1", "counters"),
    M("T16", "train.py", "pending.append((self.step, epoch + 1,", "pending.append((self.step, epoch,",
      "counters"),
    M("T17", "train.py",
      "sampler.set_epoch(epoch, done_in_epoch)", "sampler.set_epoch(epoch, 0)", "resume"),
    M("T18", "train.py",
      "    if method.collisions:\n        ctx.collisions = method.collisions\n", "", "methods"),
    M("T19", "train.py",
      "model.logit_scale.fill_(math.log(cfg.init_logit_scale))",
      "model.logit_scale.fill_(cfg.init_logit_scale)", "methods"),
    M("T20", "train.py",
      'if cfg.batchnorm == "frozen":', 'if cfg.batchnorm == "train":', "methods"),
    # --- data -------------------------------------------------------------------------------
    M("S01", "data/splits.py",
      "sizes = [round(f * len(group)) for f in fractions]",
      "sizes = [int(f * len(group)) for f in fractions]", "data splits"),
    M("S02", "data/splits.py",
      "for i, size in enumerate(sizes, start=1):",
      "for i, size in enumerate(reversed(sizes), start=1):", "data splits"),
    M("S03", "data/splits.py",
      "        group = sorted(group)\n        rng.shuffle(group)\n        start = 0\n",
      "        rng.shuffle(group)\n        start = 0\n", "data splits"),
    M("S04", "data/splits.py",
      "        if take[c] == 0:  # from the class furthest above its share",
      "        if False:  # from the class furthest above its share", "data splits"),
    M("S05", "data/splits.py", "sum(fractions) >= 1", "sum(fractions) > 1", "data splits"),
    M("D01", "data/loader.py",
      "            torch.manual_seed(seed)\n", "            torch.manual_seed(index)\n",
      "data loader"),
    M("D02", "data/loader.py",
      "        with torch.random.fork_rng(devices=[]):\n            torch.manual_seed(seed)\n"
      "            return self.transform(image), sample.label, seed",
      "        torch.manual_seed(seed)\n        return self.transform(image), sample.label, seed",
      "data loader"),
    M("D03", "data/loader.py",
      "manual_seed(self.seed * 100_003 + self.epoch)", "manual_seed(self.seed)", "data loader"),
    M("D04", "data/loader.py",
      "range(self.start * self.batch_size * self.world, used)",
      "range(self.start * self.batch_size, used)", "data loader"),
    M("D05", "data/loader.py",
      "return self.n // (self.batch_size * self.world)", "return self.n // self.batch_size",
      "data loader"),
    # --- distributed ------------------------------------------------------------------------
    M("X01", "distributed.py", "    flat /= world\n", "", "distributed"),
    M("X02", "distributed.py",
      "torch.cat(all_gather(image_features), dim=0)",
      "torch.cat(all_gather(image_features.detach()), dim=0)", "distributed"),
    M("X04", "gradcache.py",  # DDP: the last gradient-cache chunk under no_sync too
      "ddp.no_sync() if ddp is not None and not last", "ddp.no_sync() if ddp is not None",
      "distributed"),
    M("X03", "distributed.py",
      "return images, texts, torch.cat(gathered)",
      "return images, texts, torch.cat(gathered[::-1])", "distributed"),
    # --- evaluation -------------------------------------------------------------------------
    M("V01", "evaluate.py",
      '"balanced_accuracy": float(per_class.mean())',
      '"balanced_accuracy": float(correct.mean())', "evaluation"),
    M("V02", "evaluate.py",
      '"worst_class_accuracy": float(per_class.min())',
      '"worst_class_accuracy": float(per_class.max())', "evaluation"),
    M("V03", "evaluate.py",
      '"ood_mean": float(np.mean(ood)) if ood else None',
      '"ood_mean": float(np.median(ood)) if ood else None', "evaluation"),
    M("V04", "evaluate.py",
      '"id": sets[id_name][metric] if id_name in sets else None',
      '"id": sets[id_name]["accuracy"] if id_name in sets else None', "evaluation"),
    M("V05", "evaluate.py",
      'keep = torch.full_like(logits, float("-inf"))', "keep = torch.zeros_like(logits)",
      "evaluation"),
    # --- recipe: the rules declared beside each field ---------------------------------------
    M("R01", "recipe.py",
      'if "above" in rules and value <= rules["above"]:',
      'if "above" in rules and value < rules["above"]:', "recipe"),
    M("R02", "recipe.py",
      "rules = {k: v for k, v in rules.items() if v is not None and v is not False}",
      "rules = {k: v for k, v in rules.items() if v not in (None, False)}", "recipe"),
    M("R03", "recipe.py",
      "log_every: int = setting(20, at_least=1, resume=True)",
      "log_every: int = setting(20, at_least=1)", "recipe"),
    # --- gradient cache ---------------------------------------------------------------------
    M("G01", "gradcache.py",
      "        state.restore()\n        with _syncing(", "        with _syncing(", "gradcache"),
    M("G02", "gradcache.py", "    after.restore()\n", "", "gradcache"),
    M("G03", "gradcache.py",
      "share = (part.stop - part.start) / n", "share = 1 / len(chunks(n, micro_batch))",
      "gradcache"),
    M("G04", "gradcache.py",
      "total += loss.detach().float() * share", "total += loss.detach().float()", "gradcache"),
    # --- speed: caches and CPU settings that must not change a number ---------------------
    M("C01", "reuse.py", "        return all(torch.equal(state[k], v) for k, v in self.reference.items())",
      "        return True", "speed"),
    M("C02", "data/loader.py", "        image = self.decoded.get(index)",
      "        image = self.decoded.get(index + 1)", "speed"),
    M("C03", "experiment.py", "        return replace(self, recipe=recipe)",
      "        return replace(self, recipe=recipe, train_images=DecodedImages())", "speed"),
    M("C04", "data/loader.py",
      "yield tuple(t[start : start + self.batch_size] for t in self.dataset.tensors)",
      "yield tuple(t[start : start + self.batch_size - 1] for t in self.dataset.tensors)", "speed"),
    M("C05", "methods.py", "return text[where.to(device, non_blocking=True)]",
      "return text[where.sort().values.to(device, non_blocking=True)]", "speed"),
    M("C06", "ensemble.py", "        if not first.is_floating_point() or shared:",
      "        if not first.is_floating_point():", "speed"),
    M("C07", "models/base.py", "            return forward(self.module, x.float()).to(x.dtype)",
      "            return forward(self.module, x.float())", "speed"),
    M("C08", "evaluate.py", 'exp.frozen.get(f"{key} {precision}",',
      'exp.frozen.get(f"{key}",', "speed"),
]
# fmt: on

# Test files that exercise an area: they run first, so a caught mutant stops early; with
# --focus they are the only ones run (with tests/test_mutants.py).
FIRST = {
    "losses": ["test_losses.py", "test_gradcache.py"],
    "methods": ["test_methods.py", "test_heads.py", "test_gradcache.py", "test_train.py"],
    "heads": ["test_heads.py", "test_methods.py"],
    "ensemble": ["test_methods.py"],
    "probe": ["test_methods.py"],
    "schedule": ["test_pinned.py", "test_train.py", "test_speed_options.py"],
    "optimizer groups": ["test_pinned.py", "test_train.py", "test_speed_options.py"],
    "selection": ["test_pinned.py", "test_trust_training.py", "test_train.py"],
    "resume": ["test_train.py", "test_trust_training.py", "test_distributed.py"],
    "counters": ["test_train.py"],
    "data splits": ["test_data.py"],
    "data loader": ["test_data.py", "test_train.py", "test_distributed.py"],
    "distributed": ["test_distributed.py", "test_ddp.py"],
    "evaluation": ["test_evaluate.py", "test_paper_benchmarks.py", "test_methods.py"],
    "gradcache": ["test_gradcache.py", "test_speed_options.py"],
    "recipe": ["test_recipe_rules.py", "test_recipe.py", "test_bad_inputs.py"],
    "speed": ["test_reuse.py", "test_cpu_bf16.py", "test_gradcache.py"],
}


SLOW = {
    "test_train.py",
    "test_distributed.py",
    "test_speed_options.py",
    "test_paper_benchmarks.py",
    "test_pinned.py",
    "test_trust_training.py",
}


def check_snippets(mutants: list[Mutant], src: Path) -> list[str]:
    """One line per mutant whose snippet is not in its file exactly once."""
    problems = []
    for m in mutants:
        path = src / "flyp" / m.file
        count = path.read_text().count(m.snippet) if path.exists() else -1
        if count != 1:
            where = "file missing" if count < 0 else f"found {count} times"
            problems.append(f"{m.id}: snippet of src/flyp/{m.file} {where}: {m.snippet!r}")
    return problems


def make_copy(dest: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)


def test_order(area: str, tests: Path, focus: bool, mutants_last: bool = False) -> list[str]:
    """Every test file, those of the mutant's area first (pytest keeps the order of files
    named one by one; naming a file and its folder would not move it forward); with ``focus``
    only those. ``mutants_last``: tests/test_mutants.py after the area's quick files (and
    before its slow ones, except for the distributed area), so that a mutant caught there was
    missed by the quick files of its area."""
    area_files = FIRST.get(area, [])
    if mutants_last:
        slow_first = area == "distributed"
        quick = [f for f in area_files if slow_first or f not in SLOW]
        first = [*quick, "test_mutants.py", *[f for f in area_files if f not in quick]]
    else:
        first = ["test_mutants.py", *area_files]
    every = [] if focus and area else sorted(p.name for p in tests.glob("test_*.py"))
    return [f"tests/{f}" for f in dict.fromkeys([*first, *every]) if (tests / f).exists()]


def first_failure(output: str) -> str:
    for pattern in (r"^(?:FAILED|ERROR) (\S+)", r"^(\S+::\S+) FAILED", r"^ERROR collecting (\S+)"):
        found = re.search(pattern, output, re.MULTILINE)
        if found:
            return found.group(1)
    return "?"


def run_one(
    mutant: Mutant | None,
    timeout: float,
    python: str,
    without: list[str],
    skip: list[str],
    focus: bool = False,
    tests: list[str] | None = None,
    mutants_last: bool = False,
) -> dict:
    """Copy, mutate (unless ``mutant`` is None: the baseline, run to the end), run the suite;
    the outcome. ``skip``: node ids left out (tests the unmutated tree already fails)."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="flyp-mutant-") as tmp:
        copy = Path(tmp)
        make_copy(copy)
        for name in without:  # e.g. the catch rate before a test file existed
            (copy / "tests" / name).unlink(missing_ok=True)
        area = mutant.area if mutant else ""
        if mutant is not None:
            path = copy / "src" / "flyp" / mutant.file
            text = path.read_text()
            if text.count(mutant.snippet) != 1:
                raise SystemExit(f"{mutant.id}: snippet not found exactly once in {mutant.file}")
            path.write_text(text.replace(mutant.snippet, mutant.replacement))
        env = {
            **os.environ,
            "PYTHONPATH": str(copy / "src"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        imported = subprocess.run(
            [python, "-c", "import flyp; print(flyp.__file__)"],
            cwd=copy, env=env, capture_output=True, text=True,
        )  # fmt: skip
        if not imported.stdout.strip().startswith(str(copy)):
            raise SystemExit(
                f"the copy is not what gets imported: {imported.stdout}{imported.stderr}"
            )
        cmd = [
            python,
            "-m",
            "pytest",
            *(tests or test_order(area, copy / "tests", focus, mutants_last)),
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        cmd += ["-x"] if mutant is not None else ["-rfE"]
        cmd += [arg for node in skip for arg in ("--deselect", node)]
        try:
            proc = subprocess.run(
                cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
            )
            output = proc.stdout + proc.stderr
            failed, first = proc.returncode != 0, first_failure(output)
            if proc.returncode not in (0, 1):  # 2-5: collection error, usage, no tests...
                first = f"{first} (pytest exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            output, failed, first = "", True, f"timeout after {timeout:.0f} s"
    return {
        "id": mutant.id if mutant else "baseline",
        "area": area or "-",
        "caught": failed,
        "first": first if failed else "",
        "seconds": time.time() - started,
        "failures": re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE),
        "output": output,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds per mutant (default 300)"
    )
    parser.add_argument(
        "--baseline", action="store_true",
        help="first run the unmutated suite; tests it fails are deselected from every mutant run",
    )  # fmt: skip
    parser.add_argument(
        "--show-output", action="store_true", help="print the end of pytest's output"
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--focus", action="store_true",
        help="run only tests/test_mutants.py and the area's test files (a survivor here may "
        "still be caught by the rest: confirm it without --focus)",
    )  # fmt: skip
    parser.add_argument(
        "--mutants-last", action="store_true",
        help="run tests/test_mutants.py after the area's files: the rate without it is printed too",
    )  # fmt: skip
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="PATH",
        help="run only these test files (e.g. tests/test_mutants.py)",
    )
    parser.add_argument(
        "--without", nargs="+", default=[], metavar="FILE", help="test files left out of the copy"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter with flyp's dependencies"
    )
    args = parser.parse_args()
    # a stopped campaign kills its pytest and removes its temporary copy
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    chosen = MUTANTS
    if args.only:
        known = {m.id for m in MUTANTS}
        unknown = [i for i in args.only if i not in known]
        if unknown:
            parser.error(f"unknown mutant ids {unknown}; see --list")
        chosen = [m for m in MUTANTS if m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id:5} {m.area:18} src/flyp/{m.file}")
        return 0
    problems = check_snippets(chosen, ROOT / "src")
    if problems:
        print(
            "snippets that no longer match (update them in benchmarks/mutation_check.py):",
            file=sys.stderr,
        )
        print("\n".join(problems), file=sys.stderr)
        return 2
    skip: list[str] = []
    if args.baseline:
        base = run_one(None, args.timeout, args.python, args.without, [])
        skip = base["failures"]
        print(
            f"baseline: {'passes' if not base['caught'] else 'FAILS'} ({base['seconds']:.0f} s)",
            flush=True,
        )
        if base["caught"] and not skip:
            print(
                f"the unmutated suite fails ({base['first']}): every mutant would look caught",
                file=sys.stderr,
            )
            return 1
        for node in skip:  # others' work in progress: a mutant must not count as caught by it
            print(f"  deselected, fails unmutated: {node}", flush=True)

    print(f"{'id':5} {'area':18} {'result':9} {'seconds':>7}  first failing test", flush=True)
    results = []

    def report(result: dict) -> None:
        results.append(result)
        verdict = "caught" if result["caught"] else "SURVIVED"
        print(
            f"{result['id']:5} {result['area']:18} {verdict:9} {result['seconds']:7.1f}  {result['first']}",
            flush=True,
        )
        if args.show_output:
            print(result["output"][-3000:], flush=True)

    if args.jobs <= 1:
        for m in chosen:
            report(
                run_one(
                    m,
                    args.timeout,
                    args.python,
                    args.without,
                    skip,
                    args.focus,
                    args.tests,
                    args.mutants_last,
                )
            )
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            for result in pool.map(
                lambda m: run_one(
                    m,
                    args.timeout,
                    args.python,
                    args.without,
                    skip,
                    args.focus,
                    args.tests,
                    args.mutants_last,
                ),
                chosen,
            ):
                report(result)
    caught = sum(r["caught"] for r in results)
    survivors = [r["id"] for r in results if not r["caught"]]
    print(f"\ncaught {caught}/{len(results)} = {100 * caught / len(results):.1f}%")
    if args.mutants_last:
        before = sum(r["caught"] and "test_mutants.py" not in r["first"] for r in results)
        print(
            f"caught without tests/test_mutants.py: {before}/{len(results)} = {100 * before / len(results):.1f}%"
        )
    if survivors:
        print("survived: " + " ".join(survivors))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
