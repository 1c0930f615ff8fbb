"""The paper's comparison: several methods on the same splits and seeds, each with its WiSE-FT
curve, optionally soups over seeds; then the report.

out_dir/
  <method>-s<seed>/   one run directory per method and seed (metrics.json, wise.json, weights);
                      a seed-free method's (lp) other seeds hold its first seed's files as
                      hard links, so they are stored once
    wise-model/       the WiSE-FT model at an alpha the user keeps (eval.wise_keep, or
                      flyp wise RUN --keep ALPHA); not written otherwise
  soups/              each merge of a method's seeds (with --soups / --stock and several seeds)
  (a WiSE or merged model's folder holds model.safetensors, recipe.yaml and metrics.json, as a
  run directory does: flyp predict, flyp.load_classifier, flyp evaluate and flyp export take it)
  report.md, results.json, results.csv, figure.png
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from flyp import progress, tracking
from flyp.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_weights,
    read_json,
    read_metadata,
    save_weights,
)
from flyp.distributed import init_distributed, on_main
from flyp.ensemble import greedy_soup, interpolate, model_stock, uniform_soup
from flyp.errors import RunError
from flyp.evaluate import evaluate_states, summarise, validation_score
from flyp.experiment import Experiment, loss_context, prepare
from flyp.metadata import weights_metadata
from flyp.methods import (
    Classifier,
    build_classifier,
    get_method,
    image_tower_names,
    is_scale_param,
)
from flyp.probe import fit_probe
from flyp.recipe import (
    Recipe,
    RecipeError,
    check_device,
    check_seed,
    fingerprint,
    load_recipe,
    run_settings,
    save_recipe,
    with_overrides,
)
from flyp.report import write_report
from flyp.reuse import FrozenFeatures
from flyp.rundir import LOCK_NAME, check_same_run
from flyp.train import finetune


def _reset(exp: Experiment, pretrained: dict[str, torch.Tensor]) -> None:
    exp.bundle.model.load_state_dict(pretrained)


def zeroshot_classifier(exp: Experiment, method_name: str, pretrained: dict[str, torch.Tensor]) -> Classifier:
    """The zero-shot end of a method's WiSE line: pretrained towers, and for head methods the
    head a finetuning run starts from (zero-shot class embeddings times the temperature)."""
    _reset(exp, pretrained)
    method = get_method(method_name)
    return build_classifier(method, exp.bundle.model, loss_context(exp))


WISE_MODEL = "wise-model"  # a run's WiSE-FT model at the chosen alpha: RUN/wise-model/


def _changed(key: str) -> bool:
    """What a model that trained nothing (lp) differs in from the pretrained one: the head and
    the temperature (as flyp.train stores such a run)."""
    return not key.startswith("model.") or is_scale_param(key.removeprefix("model."))


def save_model(
    classifier: Classifier, exp: Experiment, folder: Path, source_run: Path, merge: dict
) -> None:
    """``classifier`` (a WiSE-FT point or a merge of runs) stored as a finished run stores its
    model, so whatever takes a run takes ``folder``: model.safetensors, self-describing as a
    run's (flyp.metadata.weights_metadata, plus ``merge``: what was merged and how), and the
    recipe.yaml of ``source_run``, the run it came from (the experiment's recipe with the run's
    method where the run has none). The caller writes metrics.json last: its presence marks the
    folder finished."""
    source = source_run / "recipe.yaml"
    if source.is_file():
        recipe = load_recipe(source)
    else:
        recipe = copy.deepcopy(exp.recipe)
        recipe.train.method = read_json(source_run / "metrics.json", ("method",))["method"]
    untrained = get_method(recipe.train.method).objective == "none"  # lp: towers untouched
    tensors = "changed" if untrained else "full"
    meta = weights_metadata(exp.bundle, recipe, exp.benchmark, classifier, tensors)
    meta["merge"] = merge
    save_weights(classifier, folder / "model.safetensors", meta, _changed if untrained else None)
    if source.is_file():
        atomic_write_text(folder / "recipe.yaml", source.read_text())
    else:
        save_recipe(recipe, folder / "recipe.yaml")


def _point(alpha: float, sets: dict, exp: Experiment) -> dict[str, Any]:
    b = exp.benchmark
    return {"alpha": alpha, **summarise(sets, b.id_name, b.ood_names, b.metric), "sets": sets}


def swept_sets(run_dir: Path) -> dict[float, dict]:
    """{alpha: per-set metrics} of the WiSE-FT points that ``run_dir``'s wise.json holds for
    the run now in ``run_dir`` (none when it sweeps another run): what a new sweep or a kept
    model reuses instead of evaluating again."""
    if not (run_dir / "wise.json").is_file() or not (run_dir / "metrics.json").is_file():
        return {}
    wise = read_json(run_dir / "wise.json", ("points",))
    run = read_json(run_dir / "metrics.json", ("sets",)).get("fingerprint")
    if wise.get("fingerprint") != run:
        return {}
    return {p["alpha"]: p["sets"] for p in wise["points"] if isinstance(p, dict) and "sets" in p}


def wise_sweep(
    exp: Experiment,
    run_dir: Path,
    alphas: Sequence[float],
    pretrained: dict[str, torch.Tensor],
    known: dict[float, dict] | None = None,
    keep: float | str | None = None,
) -> dict[str, Any]:
    """Evaluate the interpolations of a finished run and pick alpha on ID validation
    (``wise.json``). The model at an alpha is written only where ``keep`` asks for one: a
    number, or "best" for the alpha chosen (``RUN/wise-model``, see :func:`save_model`); a
    model kept before of this same run stays named in wise.json. ``known``: the metrics of
    alphas already evaluated.

    Every alpha not known is scored in one read of each set (flyp.evaluate.evaluate_states:
    each batch decoded once, forwarded through each interpolation). Under torchrun every rank
    calls this and scores its share; rank 0 reads what was swept before, and writes."""
    metrics = read_json(run_dir / "metrics.json", ("method", "seed", "sets"))
    given = {a: sets for a, sets in (known or {}).items() if sets is not None}
    known = {**on_main(partial(swept_sets, run_dir)), **given}
    known.setdefault(1.0, metrics["sets"])
    classifier = zeroshot_classifier(exp, metrics["method"], pretrained)
    zeroshot = copy.deepcopy(classifier.state_dict())
    load_weights(classifier, run_dir / "model.safetensors", metrics["method"])
    finetuned = copy.deepcopy(classifier.state_dict())
    todo = [alpha for alpha in alphas if alpha not in known]
    if todo:
        named = ",".join(f"{alpha:g}" for alpha in todo)
        with tracking.running(f"{metrics['method']} seed {metrics['seed']} WiSE α={named}"):
            states = [partial(interpolate, zeroshot, finetuned, alpha) for alpha in todo]
            known.update(zip(todo, evaluate_states(classifier, exp, states), strict=True))
    points = [_point(alpha, known[alpha], exp) for alpha in alphas]
    best = max(points, key=lambda p: (p["val"], -abs(p["alpha"] - 0.5)))
    result = {"method": metrics["method"], "seed": metrics["seed"], "best_alpha": best["alpha"], "points": points}
    result["fingerprint"] = metrics.get("fingerprint")  # the run it interpolates (compare checks)
    model_dir = run_dir / WISE_MODEL
    kept = on_main(partial(_kept_alpha, run_dir))
    model: tuple[float, dict] | None = None
    if keep is not None:
        alpha = best["alpha"] if keep == "best" else float(keep)
        point = next((p for p in points if p["alpha"] == alpha), None)
        state = partial(interpolate, zeroshot, finetuned, alpha)
        if point is None:  # an alpha outside the sweep: its numbers for the model's metrics
            with tracking.running(f"{metrics['method']} seed {metrics['seed']} WiSE α={alpha:g}"):
                point = _point(alpha, evaluate_states(classifier, exp, [state])[0], exp)
        classifier.load_state_dict(state())
        name = f"{metrics['method']} WiSE-FT (α={alpha:g})"
        model_metrics = {"method": name, "seed": metrics["seed"], "recipe": exp.recipe.name, **point}
        model_metrics["fingerprint"] = metrics.get("fingerprint")
        model = alpha, {**model_metrics, "source_run": str(run_dir)}
        kept = alpha
    if kept is not None:
        result.update(model=str(model_dir), kept_alpha=kept)

    def write() -> None:
        if model is not None:
            save_model(classifier, exp, model_dir, run_dir, {"kind": "wise-ft", "alpha": model[0]})
            atomic_write_json(model_dir / "metrics.json", model[1])
        atomic_write_json(run_dir / "wise.json", result)

    on_main(write)
    _reset(exp, pretrained)
    return result


def _kept_alpha(run_dir: Path) -> float | None:
    """The alpha of ``RUN/wise-model`` when it is a finished WiSE-FT model of the run now in
    ``run_dir`` (one of a run since replaced is not named), else None."""
    path = run_dir / WISE_MODEL / "metrics.json"
    if not path.is_file() or not (run_dir / "metrics.json").is_file():
        return None
    model = read_json(path, ("alpha",))
    run = read_json(run_dir / "metrics.json", ("sets",)).get("fingerprint")
    return model["alpha"] if model.get("fingerprint") == run else None


SOUPS = ("uniform", "greedy")


def _soup_dir(out_dir: Path, method: str, kind: str) -> Path:
    return out_dir / f"{method}-soup-{kind.replace(' ', '-')}"


def _sources(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """What a merge was made of: each run, its fingerprint and its weights file's size and
    time, so a soup of runs since retrained or replaced is not taken for finished."""
    out = []
    for run_dir in run_dirs:
        weights = (run_dir / "model.safetensors").stat()
        run = read_json(run_dir / "metrics.json", ("sets",))
        out.append(
            {
                "run": str(run_dir),
                "fingerprint": run.get("fingerprint"),
                "weights": [weights.st_size, weights.st_mtime_ns],
            }
        )
    return out


def _finished_merges(
    out_dir: Path, method: str, run_dirs: Sequence[Path], kinds: Sequence[str]
) -> dict[str, Path]:
    """{kind: folder} of the merges of ``kinds`` already finished over exactly these runs: a
    rerun leaves them in place. A greedy soup that kept every run is the uniform one (its
    folder's metrics say ``"is_also": ["greedy"]``)."""
    sources = _sources(run_dirs)
    done: dict[str, Path] = {}
    for kind in kinds:
        folder = _soup_dir(out_dir, method, kind)
        metrics = folder / "metrics.json"
        if metrics.is_file() and read_json(metrics, ("sets",)).get("sources") == sources:
            done[kind] = folder
    uniform = done.get("uniform")
    if "greedy" in kinds and "greedy" not in done and uniform is not None:
        if "greedy" in read_json(uniform / "metrics.json", ("sets",)).get("is_also", []):
            done["greedy"] = uniform
    return done


def make_soups(
    exp: Experiment,
    run_dirs: Sequence[Path],
    out_dir: Path,
    pretrained: dict[str, torch.Tensor],
    kinds: Sequence[str] = SOUPS,
) -> list[Path]:
    """Weight-space merges of one method's runs: ``uniform`` and ``greedy`` soups (greedy
    ordered and accepted on ID validation) and ``model stock``, anchored at the weights the
    method's finetuning started from: the pretrained towers with, for head methods, the
    zero-shot head, except LP-FT, which starts from its linear probe (fitted again here as its
    runs fitted it: same features, same C chosen on ID validation). Each merge is kept as a
    model folder (see :func:`save_model`) with its metrics.

    The greedy soup's candidates are scored on ID validation one after another; the merges are
    then scored together, in one read of each set. Under torchrun every rank calls this and
    scores its share; rank 0 reads what is finished, and writes.

    A merge finished before over the same runs is left in place, not made again. A greedy soup
    that keeps every run is the uniform soup (greedy = uniform): stored and reported once, as
    "<method> soup (uniform = greedy)", not as a second model that differs only by the order
    of a float sum."""
    method = read_json(run_dirs[0] / "metrics.json", ("method",))["method"]
    done = on_main(partial(_finished_merges, out_dir, method, run_dirs, kinds))
    if done:
        folders = ", ".join(sorted({str(f) for f in done.values()}))
        tracking.note(f"reused {folders} (finished over the same runs)")  # "<method> soups: ..."
    todo = [kind for kind in kinds if kind not in done]
    if not todo:
        return list(dict.fromkeys(done.values()))
    classifier = zeroshot_classifier(exp, method, pretrained)
    starts_from = "the pretrained weights" + (", zero-shot head" if classifier.head else "")
    if "model stock" in todo and get_method(method).probe:
        fit_probe(classifier, exp, _soup_dir(out_dir, method, "model stock"))  # writes probe.json
        starts_from = "the pretrained weights, linear probe"
    anchor = copy.deepcopy(classifier.state_dict())
    states = []
    for run_dir in run_dirs:
        load_weights(classifier, run_dir / "model.safetensors", method)
        states.append(copy.deepcopy(classifier.state_dict()))

    def val_score(state) -> float:  # the headline metric on ID validation
        classifier.load_state_dict(state)
        return validation_score(classifier, exp)

    merges = []
    same_as: list[str] = []
    if "greedy" in todo:
        greedy, kept = greedy_soup(states, val_score)
        if len(kept) == len(states) and "uniform" in kinds:  # every run: the uniform soup
            tracking.note(
                f"the greedy soup kept all {len(states)} runs: it is the uniform soup "
                "(greedy = uniform), stored once"
            )
            same_as = ["greedy"]
            todo = [k for k in todo if k != "greedy"]
            if "uniform" in done:  # name the finished uniform soup the greedy one too
                done["greedy"] = done["uniform"]
                on_main(partial(_add_same_as, done["uniform"], method))
        else:
            merges.append(("greedy", greedy, {"kept_runs": [str(run_dirs[i]) for i in kept]}))
    if "uniform" in todo:
        merges.insert(0, ("uniform", uniform_soup(states), {"is_also": same_as} if same_as else {}))
    if "model stock" in todo:
        merged, ratios = model_stock(anchor, states)  # t of the tensors that moved only
        stock = {
            "anchor": starts_from,
            "mean_t": sum(ratios.values()) / len(ratios) if ratios else None,
            "moved_tensors": len(ratios),
            "t": ratios,
        }
        merges.append(("model stock", merged, stock))
    sources = _sources(run_dirs)
    written = dict(done)
    scored = evaluate_states(classifier, exp, [state for _, state, _ in merges])
    for (name, state, extra), sets in zip(merges, scored, strict=True):
        classifier.load_state_dict(state)
        soup_dir = _soup_dir(out_dir, method, name)
        label = f"{name} = greedy" if extra.get("is_also") else name
        merge = {"kind": f"{label} soup" if name != "model stock" else name}
        merge["runs"] = [str(d) for d in extra.get("kept_runs", run_dirs)]
        b = exp.benchmark
        soup_metrics = {
            "method": f"{method} soup ({label})",
            "seed": -1,
            "recipe": exp.recipe.name,
            **summarise(sets, b.id_name, b.ood_names, b.metric),
            "sets": sets,
            "runs": [str(d) for d in run_dirs],
            "sources": sources,
            **extra,
        }
        on_main(partial(_write_merge, classifier, exp, soup_dir, run_dirs[0], merge, soup_metrics))
        written[name] = soup_dir
        if extra.get("is_also"):
            written["greedy"] = soup_dir
    if same_as:  # a greedy soup folder of an earlier run of other runs would be reported too
        on_main(partial(shutil.rmtree, _soup_dir(out_dir, method, "greedy"), ignore_errors=True))
    _reset(exp, pretrained)
    return list(dict.fromkeys(written[k] for k in kinds if k in written))


def _add_same_as(folder: Path, method: str) -> None:
    """Mark a finished uniform soup as the greedy one too (greedy kept every run)."""
    metrics = read_json(folder / "metrics.json", ("sets",))
    metrics.update(method=f"{method} soup (uniform = greedy)", is_also=["greedy"])
    atomic_write_json(folder / "metrics.json", metrics)


def _write_merge(
    classifier: Classifier, exp: Experiment, folder: Path, source: Path, merge: dict, metrics: dict
) -> None:
    save_model(classifier, exp, folder, source, merge)
    atomic_write_json(folder / "metrics.json", metrics)


# Methods whose runs do not depend on train.seed: zeroshot trains nothing, and lp's probe is a
# deterministic L-BFGS fit on the pretrained tower's (deterministic) features, its C chosen on
# validation (tests/test_trust_runs.py checks two seeds give the same weights and numbers).
SEED_FREE = ("zeroshot", "lp")


def check_request(
    recipe: Recipe,
    methods: Sequence[str],
    seeds: Sequence[int],
    soups: bool = False,
    stock: bool = False,
) -> None:
    """What a comparison is asked for, refused before any work when it cannot run as asked:
    an unknown method, a seed numpy cannot take, a device this machine lacks, a merge with
    nothing to merge (one seed, or no method that trains)."""
    for name in methods:
        get_method(name)  # unknown names fail before any training
    for seed in seeds:
        check_seed(seed, "--seeds")
    check_device(recipe.train.device)
    for flag, asked in (("--soups", soups), ("--stock", stock)):
        if asked and len(seeds) < 2:
            raise RecipeError(
                f"{flag} merges each method's runs over several seeds, and one seed leaves "
                f"nothing to merge; give --seeds 0 1 or more (or drop {flag})"
            )
        if asked and all(get_method(m).objective == "none" for m in methods):
            raise RecipeError(
                f"{flag} merges the runs of methods that train, and none of --methods "
                f"{' '.join(methods)} does; add ft, lpft, l2sp or flyp (or drop {flag})"
            )


def _link_or_copy(source: str, target: str) -> None:
    """``target`` as a hard link to ``source`` (the same bytes, stored once), or a copy where
    the file system has no hard links. Nothing writes into a finished run's files in place
    (every writer replaces a file whole: flyp.checkpoint), so a link cannot change both."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _copy_seed_free(source: Path, target: Path, recipe: Recipe) -> None:
    """A seed-free run (lp) reported for another seed: ``source``'s files as hard links (the
    weights and logs stored once), its recipe, metrics and WiSE sweep written anew, relabelled
    with ``recipe``'s seed and marked as the same run. Its tracker logs and a kept WiSE-FT
    model stay behind: they name the run that was trained, and this one was not."""
    staging = target.parent / f".{target.name}.copying"
    shutil.rmtree(staging, ignore_errors=True)
    skip = shutil.ignore_patterns(LOCK_NAME, "wandb", "tensorboard", WISE_MODEL)
    shutil.copytree(source, staging, ignore=skip, copy_function=_link_or_copy)
    save_recipe(recipe, staging / "recipe.yaml")
    metrics = read_json(staging / "metrics.json", ("sets",))
    settings = run_settings(recipe)
    note = f"the same run as {source.name}: {recipe.train.method} does not depend on the seed"
    metrics.update(seed=recipe.train.seed, settings=settings, fingerprint=fingerprint(settings))
    atomic_write_json(staging / "metrics.json", {**metrics, "same_as": str(source), "note": note})
    if (staging / "wise.json").exists():
        wise = read_json(staging / "wise.json", ("points",))
        wise.update(seed=recipe.train.seed, fingerprint=metrics["fingerprint"])
        wise.pop("model", None), wise.pop("kept_alpha", None)  # the model stays with source
        atomic_write_json(staging / "wise.json", wise)
    staging.rename(target)


def _wise_is_current(run_dir: Path, alphas: Sequence[float], keep: bool = False) -> bool:
    """Whether ``run_dir``'s wise.json sweeps these alphas over the run now in ``run_dir``
    (one from other alphas, e.g. ``flyp wise --alphas``, or another run, is redone), with, if
    ``keep``, the model at the chosen alpha kept."""
    if not (run_dir / "wise.json").exists():
        return False  # never swept
    wise = read_json(run_dir / "wise.json", ("points", "best_alpha"))
    run = read_json(run_dir / "metrics.json", ("sets",)).get("fingerprint")
    swept = [p.get("alpha") for p in wise["points"] if isinstance(p, dict)]
    current = swept == list(alphas) and wise.get("fingerprint") == run
    return current and (not keep or _kept_alpha(run_dir) == wise["best_alpha"])


def check_same_data(run_dir: Path, exp: Experiment) -> None:
    """A finished run about to be reused must have been trained on the data the recipe reads
    now. data.root may change without changing the run (the data moved), so a rerun pointed at
    another dataset with the same domain names would report runs of the old one: the run's
    classes (its weights metadata) and the size of each evaluation set must match."""
    if not (run_dir / "metrics.json").is_file():
        return
    bench = exp.benchmark
    metrics = read_json(run_dir / "metrics.json", ("sets",))
    weights = run_dir / "model.safetensors"
    classes = (read_metadata(weights) or {}).get("class_names") if weights.is_file() else None
    sizes = {name: len(samples) for name, samples in bench.eval_sets().items()}
    was = {name: s.get("n") for name, s in metrics["sets"].items() if name in sizes}
    if metrics.get("skipped_images") or metrics.get("skipped_links"):  # may be read now
        was = {}
    differs = [f"{n} {was[n]} -> {sizes[n]} images" for n in was if was[n] != sizes[n]]
    if classes is not None and list(classes) != list(bench.class_names):
        differs.insert(0, f"classes {_some(classes)} -> {_some(bench.class_names)}")
    if differs:
        raise RunError(
            f"{run_dir} holds a run trained on other data than {exp.recipe.data.root} "
            f"({', '.join(differs[:3])}): it belongs to another experiment; pass a new --out"
        )


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@progress.ends_plan
def compare(
    recipe: Recipe,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    wise: bool = True,
    soups: bool = False,
    stock: bool = False,
    method_overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run every method for every seed (finished runs are reused, killed ones resumed), sweep
    WiSE-FT, merge the seeds (soups, Model Stock), then report. ``method_overrides`` gives a
    method its own ``key=value`` settings (its choice from a sweep: flyp.sweep.sweep_methods).

    Every run directory already in ``out_dir`` must hold the run asked for (same settings but
    what a resume may change): one from another experiment is refused before any work. A
    seed-free method (SEED_FREE) is trained once: zeroshot in out_dir/zeroshot, lp on the
    first seed and copied, relabelled, for the others (so its spread over seeds is 0)."""
    out_dir = Path(out_dir)
    check_request(recipe, methods, seeds, soups, stock)

    def run_recipe(name: str, seed: int) -> Recipe:
        one = copy.deepcopy(recipe)
        one.train.method, one.train.seed = name, seed
        return with_overrides(one, (method_overrides or {}).get(name, ()))

    plan = [("zeroshot", seeds[0], out_dir / "zeroshot")]  # no training: one run
    plan += [(m, s, out_dir / f"{m}-s{s}") for s in seeds for m in methods if m != "zeroshot"]

    def check_plan() -> None:  # before anything is built: a stale --out is refused
        for name, seed, run_dir in plan:
            check_same_run(run_dir, run_recipe(name, seed), seed_free=run_dir.name == "zeroshot")

    # Under torchrun every rank trains each run (finetune), and rank 0 alone reads and writes
    # out_dir (what is finished, WiSE-FT, soups, the report): on_main gives every rank its answer.
    init_distributed(recipe.train.device, recipe.train.dist_timeout_s)
    on_main(check_plan)
    exp = prepare(recipe)
    for _, _, run_dir in plan:  # settings alike, but trained on another dataset (data.root)?
        on_main(partial(check_same_data, run_dir, exp))
    on_main(partial(_say_plan, plan, run_recipe, exp, wise))
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    image_names = image_tower_names(exp.bundle.model, exp.bundle.image_size)
    exp.frozen = FrozenFeatures.of(pretrained, exp.bundle.model, image_names)
    run_dirs: dict[str, list[Path]] = {}
    zeroshot_sets = None
    reused: dict[str, list[str]] = {"runs": [], "WiSE-FT sweeps": []}
    for name, seed, run_dir in plan:
        one = run_recipe(name, seed)
        first = out_dir / f"{name}-s{seeds[0]}"
        run_dirs.setdefault(name, []).append(run_dir)
        todo = on_main(partial(_next_step, run_dir, first, name in SEED_FREE))
        if todo == "copy":
            on_main(partial(_copy_seed_free, first, run_dir, one))
        elif todo == "finished":  # checked above to be this run
            reused["runs"].append(run_dir.name)
        else:
            _reset(exp, pretrained)
            finetune(one, run_dir, resume=todo == "resume", exp=exp.for_run(one))
        if name == "zeroshot":
            zeroshot_sets = _finished_sets(run_dir)
        elif wise:
            alphas, keep = exp.recipe.eval.wise_alphas, exp.recipe.eval.wise_keep
            if on_main(partial(_wise_is_current, run_dir, alphas, keep)):
                reused["WiSE-FT sweeps"].append(run_dir.name)
            else:  # every rank scores its share of the sweep; rank 0 writes
                wise_sweep(exp, run_dir, alphas, pretrained, {0.0: zeroshot_sets}, "best" if keep else None)
    if any(reused.values()):  # a rerun says what it did not do again
        said = [f"{len(v)} finished {k} ({', '.join(v)})" for k, v in reused.items() if v]
        tracking.note(f"reused {'; '.join(said)}")
    extra: list[Path] = []
    kinds = [*(SOUPS if soups else ()), *(["model stock"] if stock else [])]
    if kinds and len(seeds) > 1:
        for name, dirs in run_dirs.items():
            if get_method(name).objective != "none":
                with tracking.running(f"{name} soups"):  # names the soups' progress lines
                    extra += make_soups(exp, dirs, out_dir / "soups", pretrained, kinds)
    all_dirs = [d for dirs in run_dirs.values() for d in dirs] + extra
    tracking.note(f"report: writing {out_dir / 'report.md'}")
    title = f"{recipe.name}: {exp.bundle.spec}"
    return on_main(partial(write_report, all_dirs, out_dir, title=title))


def _say_plan(plan, run_recipe, exp: Experiment, wise: bool) -> None:
    """The comparison's size in one line before its first run (flyp.progress): the runs still
    to do (finished ones are reused), their steps and evaluations."""
    todo, steps, evaluations, images, finished, copied = 0, 0, 0, 0, 0, 0
    first_seed = plan[0][1]  # zeroshot's: the seed a seed-free run is trained on
    for name, seed, run_dir in plan:
        if (run_dir / "metrics.json").exists():
            finished += 1
            continue
        if name in SEED_FREE and seed != first_seed:
            copied += 1  # copied from its first seed's run
            continue
        one = run_recipe(name, seed)
        trains = get_method(name).objective != "none"
        alphas = one.eval.wise_alphas if wise and name != "zeroshot" else ()
        size = progress.run_size(one, exp.benchmark, trains, alphas)
        todo, steps = todo + 1, steps + size[0]
        evaluations, images = evaluations + size[1], images + size[2]
    what = [f"{finished} of {len(plan)} finished and reused"] if finished else []
    what += [f"{copied} seed-free cop{'ies' if copied > 1 else 'y'} of the first seed"] if copied else []
    progress.plan(
        todo, steps, evaluations, images, exp.recipe.train.batch_size, "; ".join(what), outer=True
    )


def _next_step(run_dir: Path, first: Path, seed_free: bool) -> str:
    """What a planned run needs: "finished", "copy" (a seed-free run done for the first seed),
    "resume" (killed: continued, or restarted) or "start"."""
    if (run_dir / "metrics.json").exists():
        return "finished"
    if seed_free and run_dir != first and (first / "metrics.json").exists():
        return "copy"
    return "resume" if (run_dir / "recipe.yaml").exists() else "start"


def _finished_sets(run_dir: Path) -> dict:
    """A finished run's per-set metrics, as rank 0 reads them (every rank gets them)."""
    return on_main(lambda: read_json(run_dir / "metrics.json", ("sets",))["sets"])


