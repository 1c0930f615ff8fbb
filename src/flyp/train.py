"""The training loop shared by every method: one file, top to bottom.

run_dir/
  recipe.yaml         the resolved recipe
  log.jsonl           one line per step (loss, lr, temperature) and per validation; the steps'
                      lines written every train.log_every steps, at checkpoints and epoch ends
  state.pt            resumable state (optimizer, scheduler, RNG, step, best so far)
  last.safetensors    weights at the last checkpoint (for resume)
  model.safetensors   the selected weights (best ID validation epoch, or the last)
  metrics.json        every evaluation set, the ID value, the OOD mean
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flyp.checkpoint import (
    atomic_write_json,
    load_state,
    load_weights,
    read_json,
    read_metadata,
    save_state,
    save_weights,
)
from flyp.data.loader import EpochSampler, ImageDataset, train_loader
from flyp.distributed import (
    DistEnv,
    average_gradients,
    barrier,
    broadcast_buffers,
    broadcast_module,
    ddp_for,
    gather_batch,
    init_distributed,
    on_main,
)
from flyp.errors import RunError  # callers import it from here too
from flyp.evaluate import evaluate_classifier, summarise, validation_score
from flyp.experiment import Experiment, loss_context, prepare  # callers import them from here
from flyp.gradcache import forward_backward
from flyp.metadata import weights_metadata
from flyp.methods import (
    Classifier,
    LossContext,
    build_classifier,
    frozen_reference,
    get_method,
    image_tower_names,
    is_scale_param,
    set_trainable,
)
from flyp.models.base import (
    keep_freed_memory,
    prefers_channels_last,
    to_model_layout,
    tune_cpu_bf16,
)
from flyp.precision import announce, configure_device, resolve
from flyp.probe import fit_probe
from flyp.recipe import (
    RESUME_SETTABLE,
    Recipe,
    check_device,
    differences,
    fingerprint,
    run_settings,
    save_recipe,
    validate,
)
from flyp.rundir import (
    append_log,
    check_same_run,
    claim,
    clear_run_dir,
    release,
    rng_state,
    set_rng_state,
    truncate_log,
)
from flyp.tracking import bar as progress_bar
from flyp.tracking import (
    check_trackers,
    clock,
    close_tracker,
    finish_tracker,
    note,
    open_tracker,
    running,
    say,
)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed (modules in eval mode); affine parameters still train.

    Small finetuning batches give noisy batch statistics; the pretrained ones are better.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def param_groups(classifier: Classifier, cfg) -> list[dict[str, Any]]:
    """AdamW groups, each named: "decay" (>=2-D weights), "no_decay" (norms, biases: no weight
    decay) and "scale" (temperature and bias: no decay, their own learning rate)."""
    decay, no_decay, scale = [], [], []
    for name, p in classifier.named_parameters():
        if not p.requires_grad:
            continue
        if is_scale_param(name.removeprefix("model.")):
            scale.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    scale_lr = cfg.lr if cfg.logit_scale_lr is None else cfg.logit_scale_lr  # 0 freezes it
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "scale", "params": scale, "weight_decay": 0.0, "lr": scale_lr},
    ]
    return [g for g in groups if g["params"]]


def effective_warmup(warmup: int, total: int) -> int:
    """The warmup a run of ``total`` steps gets: ``train.warmup_steps``, at most half the run.

    A warmup as long as the run would never reach ``train.lr`` (20 warmup steps in a 14-step
    run peak at 0.75 of it); capped at half, the run reaches its learning rate and spends the
    rest on the cosine decay. Runs whose warmup is at most half of them are unchanged."""
    return min(warmup, total // 2)


def warmup_cosine(warmup: int, total: int):
    warmup = effective_warmup(warmup, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _check_speed_options(cfg, env: DistEnv) -> None:
    """What the recipe alone cannot tell: the number of processes, and option combinations."""
    if cfg.batch_size % env.world:
        raise RunError(
            f"train.batch_size {cfg.batch_size} (the global batch) does not split over {env.world} "
            f"processes; use a multiple of {env.world}"
        )
    if cfg.micro_batch and cfg.batchnorm == "train":
        raise RunError(
            "train.micro_batch with train.batchnorm=train would normalise each chunk apart; "
            "use train.batchnorm=frozen"
        )


def _place_model(classifier: Classifier, ctx: LossContext, cfg, env: DistEnv) -> None:
    """Give every rank rank 0's weights (the model is already on this process's device)."""
    ctx.theta0 = {name: p.to(env.device) for name, p in ctx.theta0.items()}
    if env.enabled:
        broadcast_module(classifier)
    if cfg.compile:
        model = classifier.model
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text, dynamic=True)


TOWER_METHODS = ("encode_image", "encode_text")


@contextmanager
def _towers_restored(model: nn.Module) -> Iterator[None]:
    """Put back the model's own ``encode_image``/``encode_text`` when a run ends, however it
    ends. train.compile wraps them on the model itself, which flyp compare shares between runs:
    left there, a later run would train through the wrappers, and lipsum-ft's frozen copy
    would call the live model through them (its penalty silently ~0)."""
    own = {name: vars(model)[name] for name in TOWER_METHODS if name in vars(model)}
    try:
        yield
    finally:
        for name in TOWER_METHODS:
            vars(model).pop(name, None)
        vars(model).update(own)


def finetune(
    recipe: Recipe, run_dir: str | Path, resume: bool = False, exp: Experiment | None = None
) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` and evaluate the selected weights on every set.

    The run directory is claimed first (two runs can never share one). A run that fails before
    its first checkpoint leaves no directory behind (or, if the directory was there before, an
    empty one); after that, ``resume=True`` continues from the last checkpoint. Resuming a run
    that never reached a checkpoint starts it again.
    """
    validate(recipe)  # also a recipe changed after it was loaded (flyp compare sets method, seed)
    check_trackers(recipe)  # a missing tracker package fails before anything is built or written
    check_device(recipe.train.device)  # a GPU asked for where there is none: before any work
    run_dir = Path(run_dir)
    state_path = run_dir / "state.pt"
    # one process unless started by torchrun
    env = init_distributed(recipe.train.device, recipe.train.dist_timeout_s)
    if resume and not state_path.exists():
        if (run_dir / "metrics.json").exists():  # finished: its results, if it is this run
            check_same_run(run_dir, recipe)
            return read_json(run_dir / "metrics.json", ("sets",))
        if not (run_dir / "recipe.yaml").exists():
            raise RunError(f"nothing to resume in {run_dir}: no state.pt; start it without --resume")
    cfg = recipe.train
    _check_speed_options(cfg, env)  # before the run directory exists
    method = get_method(cfg.method)
    exp = exp or prepare(recipe)  # before the run directory exists: a bad recipe leaves nothing
    existed = run_dir.exists()
    lock = claim(run_dir, resume) if env.is_main else None
    barrier()  # every rank has waited for rank 0's claim
    try:
        if resume and not state_path.exists():  # killed before its first checkpoint: restart
            resume = False
            if env.is_main:
                clear_run_dir(run_dir)
        # running names its progress lines and bars; the towers come back uncompiled
        with running(f"{cfg.method} seed {cfg.seed}"), _towers_restored(exp.bundle.model):
            return _train(recipe, run_dir, resume, exp, env, method)
    except BaseException:
        # Nothing resumable was written: leave the directory as it was found.
        if env.is_main and not state_path.exists() and not (run_dir / "metrics.json").exists():
            if existed:
                clear_run_dir(run_dir)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        close_tracker(run_dir)  # a run that raised closes its trackers now
        if lock is not None:
            release(run_dir, lock)


def _train(
    recipe: Recipe, run_dir: Path, resume: bool, exp: Experiment, env: DistEnv, method
) -> dict[str, Any]:
    cfg = recipe.train
    state_path = run_dir / "state.pt"
    # Seeded after the model is built: loading a model draws random numbers (initialisation
    # before the weights arrive), and dropout must not depend on whether it was loaded here or
    # by the caller (flyp compare shares one loaded model across runs).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    ctx = loss_context(exp)
    settings = run_settings(recipe)
    state = load_state(state_path) if resume else None
    if state is not None and "settings" in state:  # before recipe.yaml is written again
        diff = differences(state["settings"], settings)
        if diff:
            raise RunError(
                f"{run_dir} was started with other settings than it is resumed with ({diff}); "
                "put those back in its recipe.yaml, or start a new run with --out (a resume "
                f"may change only {', '.join(RESUME_SETTABLE)})"
            )
    if env.is_main:
        save_recipe(recipe, run_dir / "recipe.yaml")
    model = exp.bundle.model
    # Everything the method builds (heads, probe, zero-shot head) is made on the run's device.
    model.to(env.device)
    channels_last = prefers_channels_last(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # "auto": bf16 where this device has it natively (flyp.precision); said in one line
    precision = resolve(cfg.precision, env.device)
    eval_precision = resolve(exp.recipe.eval.precision, env.device)
    if env.is_main:
        announce(None if method.objective == "none" else precision, eval_precision)
    configure_device(env.device)  # TF32 and cuDNN autotuning on CUDA
    if env.device.type == "cpu":
        keep_freed_memory()
        if "bf16" in (precision.name, eval_precision.name):
            tune_cpu_bf16(model)
    if cfg.init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    classifier = build_classifier(method, model, ctx)
    if method.probe:
        fit_probe(classifier, exp, run_dir)
    if method.collisions:
        ctx.collisions = method.collisions
    set_trainable(method, classifier, image_tower_names(model, exp.bundle.image_size))
    if method.l2sp:
        ctx.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if method.lipsum:  # a frozen copy of the pretrained model: one more model in memory
        ctx.reference = frozen_reference(model)  # before _place_model compiles the towers
        ctx.lipsum_weight, ctx.lipsum_texts = cfg.lipsum_weight, cfg.lipsum_texts
        ctx.lipsum_text = cfg.lipsum_text
        ctx.seed = cfg.seed

    if method.objective == "none":

        def finish_untrained() -> dict[str, Any]:
            open_tracker(recipe, run_dir, True)  # _finish sends it the metrics and closes it
            return _finish(
                classifier,
                exp,
                run_dir,
                selected_epoch=0,
                started=time.time(),
                train_seconds=0.0,
                images_seen=0,
            )

        return on_main(finish_untrained)  # rank 0 evaluates and writes; every rank gets metrics

    _place_model(classifier, ctx, cfg, env)
    # Several processes: DDP averages the gradients in the backward (once per run; the classifier
    # stays the module that is evaluated and saved); the logit scale is averaged by hand.
    ddp, by_hand = ddp_for(classifier, env.device) if env.enabled else (None, [])
    dataset = ImageDataset(
        exp.benchmark.train,
        exp.bundle.train_transform,
        decoded=exp.train_images.get(exp.benchmark.train, exp.recipe.data.cache_gb),
    )
    steps_per_epoch = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, 0).steps_per_epoch()
    if steps_per_epoch == 0:
        raise RunError(
            f"{len(dataset)} training images do not fill one batch of {cfg.batch_size}; lower train.batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        param_groups(classifier, cfg),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        # one kernel over all tensors, where torch has it (CPU, CUDA); else torch's default
        fused=(cfg.fused_optimizer and env.device.type in ("cpu", "cuda")) or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_steps, total_steps)
    )
    warmup = effective_warmup(cfg.warmup_steps, total_steps)
    if env.is_main:
        note(
            f"training {cfg.epochs} epochs of {steps_per_epoch} steps (batch {cfg.batch_size}, "
            f"lr {cfg.lr:g} after {warmup} warmup steps)"
        )
        if warmup < cfg.warmup_steps:  # said on a terminal too: the recipe asked for more
            say(
                f"train.warmup_steps={cfg.warmup_steps} is more than half of this run's "
                f"{total_steps} steps; warming up over {warmup} so that it reaches "
                f"train.lr={cfg.lr:g} (set train.warmup_steps to choose)"
            )
    scale_trains = model.logit_scale.requires_grad
    # The temperature may not go below 1/100 (CLIP's clamp), or the model's own start if that
    # is lower (SigLIP starts near 1/112): a bound that never moves a pretrained model at step 0.
    max_log_scale = max(math.log(cfg.max_logit_scale), float(model.logit_scale.detach()))
    select = cfg.select_on == "val" and exp.recipe.eval.every_epoch
    step, best, validated = 0, {"val": -1.0, "epoch": 0}, 0
    train_seconds, images_seen = 0.0, 0
    log_path = run_dir / "log.jsonl"
    if state is not None:
        load_weights(classifier, run_dir / "last.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], env.device)
        step, best = state["step"], state["best"]
        validated = state.get("validated", step // steps_per_epoch)
        train_seconds, images_seen = state["train_seconds"], state["images_seen"]
        if env.is_main:
            truncate_log(log_path, step)
    tracker = open_tracker(recipe, run_dir, env.is_main, step)  # _finish closes it
    started = time.time()

    # (step, epoch, lr, loss, temperature) of the steps since the last log point
    pending: list[tuple[int, int, float, torch.Tensor, torch.Tensor]] = []

    def log_pending(bar) -> list[float]:
        """Write the log records of the steps since the last log point, and return their losses.

        The losses and temperatures stay on the device until now and come back in one transfer:
        the host waits for the device once every ``train.log_every`` steps, not at every step.
        A non-finite loss stops the run, naming the first step that gave one (the records
        before it are written; no checkpoint is saved after it, as each waits for this check).
        """
        if not pending:
            return []
        numbers = torch.stack([torch.stack((v.float(), t.float())) for *_, v, t in pending])
        losses = []
        for (at, in_epoch, lr, *_), (value, temperature) in zip(
            pending, numbers.tolist(), strict=True
        ):
            if not math.isfinite(value):
                raise RunError(
                    f"the loss is {value} at step {at}: training diverged and nothing was "
                    f"recorded as finished; lower train.lr (now {cfg.lr:g}) and start again"
                )
            record = {"step": at, "epoch": in_epoch, "loss": round(value, 6), "lr": lr}
            record["temperature"] = temperature
            if env.is_main:
                append_log(log_path, record)
                tracker.log(record, at)
            losses.append(value)
        pending.clear()
        bar.set_postfix(loss=f"{round(losses[-1], 6):.3f}")
        return losses

    def checkpoint() -> None:
        if not env.is_main:
            return
        save_weights(classifier, run_dir / "last.safetensors")
        save_state(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(env.device),
                "step": step,
                "best": best,
                "validated": validated,
                "train_seconds": train_seconds,
                "images_seen": images_seen,
                "settings": settings,  # a resume with other settings is refused
            },
            state_path,
        )

    # One loader for the whole run: its workers persist across epochs (the sampler is told each
    # epoch's order); batches pinned for a GPU, copied with non_blocking.
    local_batch = cfg.batch_size // env.world  # batch_size is the global batch
    sampler = EpochSampler(len(dataset), local_batch, cfg.seed, 0, 0, env.rank, env.world)
    loader = train_loader(
        dataset, sampler, local_batch, exp.recipe.data.num_workers, device=env.device
    )
    while True:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        if done_in_epoch == 0 and epoch > validated:
            # The end of an epoch: validate (also when the run stopped right after its last
            # step and resumes here), keep the best weights, then checkpoint.
            if select:  # rank 0 validates and keeps the best; every rank holds its choice
                validate = partial(_validate_epoch, classifier, exp, run_dir, tracker, best)
                best = on_main(partial(validate, step, epoch))
            validated = epoch
            checkpoint()
        if step >= total_steps:
            break
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
            checkpoint()
            tracker.close()
            return {"stopped_at_step": step}
        sampler.set_epoch(epoch, done_in_epoch)
        classifier.train()
        if cfg.batchnorm == "frozen":
            freeze_batchnorm_stats(classifier)
        tick = epoch_started = time.time()
        epoch_loss, epoch_steps, epoch_images = 0.0, 0, 0  # for its progress line
        bar = progress_bar(
            iter(loader),  # one iterator: tqdm.auto would start the workers' epoch twice
            f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not env.is_main,
            initial=done_in_epoch,
            total=steps_per_epoch,
        )
        for images, labels, seeds in bar:
            images = images.to(env.device, non_blocking=True)
            images = to_model_layout(images, channels_last)
            # labels and seeds stay on the host: forward_backward builds captions from them
            if env.enabled:  # dropout: distinct per rank, and replayed exactly on resume
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 4099 + env.rank)
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(
                method,
                classifier,
                images,
                labels,
                seeds,
                step,
                ctx,
                micro_batch=cfg.micro_batch,
                precision=precision.name,
                gather=gather_batch if env.enabled else None,
                ddp=ddp,
            )
            if env.enabled:
                average_gradients(by_hand, env.world)
                if cfg.batchnorm == "train":
                    broadcast_buffers(classifier)  # rank 0's BN statistics
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip
                )
            optimizer.step()
            scheduler.step()
            if scale_trains:  # a frozen scale is the model's own and stays as it is
                with torch.no_grad():
                    model.logit_scale.clamp_(0, max_log_scale)
            step += 1
            images_seen += len(labels) * env.world  # this rank saw its share of the global batch
            epoch_images += len(labels) * env.world
            # the step's numbers stay on the device until the next log point (log_pending)
            temperature = 1 / model.logit_scale.detach().exp().reshape(())  # SigLIP's is [1]
            pending.append((step, epoch + 1, scheduler.get_last_lr()[0], loss, temperature))
            at_epoch_end = step % steps_per_epoch == 0
            stopping = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps
            saving = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 or stopping
            if step % cfg.log_every == 0 or at_epoch_end or saving:  # a checkpoint after a check
                for value in log_pending(bar):
                    epoch_loss, epoch_steps = epoch_loss + value, epoch_steps + 1
            if saving and not at_epoch_end:
                train_seconds += time.time() - tick
                tick = time.time()
                checkpoint()
            if stopping and not at_epoch_end:
                tracker.close()
                return {"stopped_at_step": step}
            if at_epoch_end:
                break  # the epoch-end work (validation, checkpoint) runs at the top of the loop
        train_seconds += time.time() - tick
        if env.is_main and epoch_steps and step % steps_per_epoch == 0:
            seconds = max(time.time() - epoch_started, 1e-9)
            note(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {epoch_loss / epoch_steps:.4f}  "
                f"{epoch_images / seconds:.1f} images/s  elapsed {clock(time.time() - started)}"
            )

    def finish() -> dict[str, Any]:
        if select:
            load_weights(classifier, run_dir / "model.safetensors")
        epoch = best["epoch"] if select else cfg.epochs  # not selecting: the last weights
        return _finish(classifier, exp, run_dir, epoch, started, train_seconds, images_seen)

    # Rank 0 evaluates and writes while the others wait at a barrier (within the process
    # group's timeout, train.dist_timeout_s); every rank returns its metrics (flyp compare and
    # flyp sweep go on from them on every rank).
    return on_main(finish)


def _validate_epoch(
    classifier: Classifier,
    exp: Experiment,
    run_dir: Path,
    tracker: Any,
    best: dict[str, Any],
    step: int,
    epoch: int,
) -> dict[str, Any]:
    """An epoch's end: the ID validation score logged, and the weights kept when they are the
    best so far (the first of equals; NaN never wins). Returns the best {"val", "epoch"}."""
    val = validation_score(classifier, exp)
    metric = exp.benchmark.metric
    entry = {"step": step, "epoch": epoch, "val": val, "val_metric": metric}
    append_log(run_dir / "log.jsonl", entry)
    tracker.log(entry, step)
    if best["epoch"] == 0 or val > best["val"]:
        save_weights(classifier, run_dir / "model.safetensors", _metadata(exp, classifier))
        return {"val": val, "epoch": epoch}
    return best


def _metadata(exp: Experiment, classifier: Classifier, tensors: str = "full") -> dict[str, Any]:
    return weights_metadata(exp.bundle, exp.recipe, exp.benchmark, classifier, tensors)


def _precisions(exp: Experiment, classifier: Classifier, untrained: bool) -> dict[str, Any]:
    """The precisions the run computed in, resolved on its device (``auto`` chooses per machine)."""
    device = classifier.model.logit_scale.device
    train = None if untrained else resolve(exp.recipe.train.precision, device).name
    return {"train": train, "eval": resolve(exp.recipe.eval.precision, device).name}


def _finish(
    classifier: Classifier,
    exp: Experiment,
    run_dir: Path,
    selected_epoch: int,
    started: float,
    train_seconds: float,
    images_seen: int,
) -> dict[str, Any]:
    # The selected weights, self-describing (flyp.predict.load_classifier needs nothing else).
    # A run that trained nothing (zeroshot, lp) stores only what it set: the head and the
    # temperature; the towers are the pretrained ones its model spec loads.
    untrained = get_method(exp.recipe.train.method).objective == "none"
    path = run_dir / "model.safetensors"

    def changed(key: str) -> bool:
        return not key.startswith("model.") or is_scale_param(key.removeprefix("model."))

    if untrained:
        save_weights(classifier, path, _metadata(exp, classifier, "changed"), changed)
    elif not path.exists() or read_metadata(path) is None:  # selection already wrote it
        save_weights(classifier, path, _metadata(exp, classifier))
    tick = time.time()
    sets = evaluate_classifier(classifier, exp, None)
    metrics = {
        "recipe": exp.recipe.name,
        "method": exp.recipe.train.method,
        "model": exp.bundle.spec,
        "seed": exp.recipe.train.seed,
        "selected_epoch": selected_epoch,
        **summarise(sets, exp.benchmark.id_name, exp.benchmark.ood_names, exp.benchmark.metric),
        "sets": sets,
        "train_seconds": round(train_seconds, 2),
        "train_images_per_second": round(images_seen / train_seconds, 2) if train_seconds else None,
        "eval_seconds": round(time.time() - tick, 2),
        "skipped_images": exp.benchmark.skipped_images,
        "precision": _precisions(exp, classifier, untrained),
        # what decides these numbers: a rerun (flyp compare, flyp sweep) or a report checks it
        "settings": run_settings(exp.recipe),
        "fingerprint": fingerprint(run_settings(exp.recipe)),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    for leftover in ("state.pt", "last.safetensors"):
        (run_dir / leftover).unlink(missing_ok=True)
    finish_tracker(run_dir, metrics)  # the final metrics to TensorBoard / W&B (train.log_to)
    return metrics
