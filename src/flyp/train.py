"""The training loop shared by every method, top to bottom:

- ``finetune``: the run directory claimed (flyp.rundir), the run, and what a failure leaves;
- ``_train``: the setup, then the loop over steps (an epoch's end handled at the loop's top);
- the setup: ``_set_up_classifier`` (device, precision, the method's classifier, what trains)
  and ``_set_up_loop`` (images, schedule, AdamW, DDP);
- the step: ``_Run.step_on``, and ``_Run.log_pending`` every ``train.log_every`` steps;
- the epoch end: ``_Run.end_epoch`` (validation, the best weights, the checkpoint);
- ``_finish``: the selected weights evaluated on every set, metrics.json written.

What a run is built from is flyp.experiment; evaluation is flyp.evaluate, the probe flyp.probe.

run_dir/
  recipe.yaml         the resolved recipe
  log.jsonl           one line per step (loss, lr, temperature) and per validation; the steps'
                      lines written every train.log_every steps, at checkpoints and epoch ends
  state.pt            the last checkpoint, one file (weights, optimizer, scheduler, RNG, step,
                      best so far): a kill leaves the old checkpoint or the new one, never a mix
  model.safetensors   the selected weights (best ID validation epoch, or the last)
  metrics.json        every evaluation set, the ID value, the OOD mean
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flyp import progress
from flyp.checkpoint import (
    CheckpointError,
    atomic_write_json,
    load_checkpoint,
    load_tensors,
    load_weights,
    read_json,
    read_metadata,
    save_state,
    save_weights,
)
from flyp.data.benchmarks import absolute_roots
from flyp.data.loader import (
    EpochSampler,
    ImageDataset,
    finish_pixels,
    train_loader,
    uint8_transform,
)
from flyp.data.stream import ShardStream, stream_loader
from flyp.distributed import (
    DistEnv,
    average_gradients,
    broadcast_buffers,
    broadcast_module,
    ddp_for,
    gather_batch,
    init_distributed,
    is_main,
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
    text_tower_names,
)
from flyp.models.base import (
    keep_freed_memory,
    prefers_channels_last,
    to_model_layout,
    tune_cpu_bf16,
)
from flyp.paths import link_fault
from flyp.precision import Precision, announce, configure_device, resolve
from flyp.probe import fit_probe
from flyp.recipe import (
    RESUME_SETTABLE,
    Recipe,
    TrainConfig,
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
    tidy_finished,
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
    for name in ("metrics.json", "state.pt") if resume else ():
        why = link_fault(run_dir / name)
        if why:  # taken as absent, the run would restart or end in silence
            raise RunError(
                f"{run_dir / name} is {why}; restore it, or start the run again with a new --out"
            )
    if resume and (run_dir / "metrics.json").exists():  # finished: its results, if this run's
        check_same_run(run_dir, recipe)
        metrics = read_json(run_dir / "metrics.json", ("sets",))
        if env.is_main:  # a kill after metrics.json was written left the last checkpoint
            tidy_finished(run_dir)
        return metrics
    if resume and not state_path.exists():
        if not (run_dir / "recipe.yaml").exists():
            raise RunError(f"nothing to resume in {run_dir}: no state.pt; start it without --resume")
    cfg = recipe.train
    _check_speed_options(cfg, env)  # before the run directory exists
    method = get_method(cfg.method)
    exp = exp or prepare(recipe)  # before the run directory exists: a bad recipe leaves nothing
    existed = run_dir.exists()
    held: list[Any] = []  # rank 0's lock; its refusal is raised on every rank at once
    on_main(lambda: held.append(claim(run_dir, resume)))
    lock = held[0] if held else None
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
        progress.run_done()  # no progress line outlives the run (a comparison's plan goes on)
        close_tracker(run_dir)  # a run that raised closes its trackers now
        if lock is not None:
            release(run_dir, lock)


def _chunk_dependent(model: nn.Module, cfg: TrainConfig) -> str | None:
    """Why a step's numbers would depend on how the batch is cut into micro-batches, or None:
    dropout (each chunk draws its own masks) or BatchNorm in train mode (each chunk's own
    statistics). Without either, the gradient cache gives the full batch's gradients."""
    if cfg.batchnorm == "train":
        return "train.batchnorm=train normalises each chunk by its own statistics"
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if isinstance(module, nn.Dropout) else None
        rate = getattr(module, "drop_prob", rate)  # timm's DropPath
        if isinstance(rate, float) and rate > 0:
            return f"{name or 'the model'} drops out at random ({type(module).__name__}, {rate:g})"
    return None


def _check_micro_batch(saved: int | None, cfg: TrainConfig, model: nn.Module, run_dir: Path) -> None:
    """train.micro_batch may change at resume only where the cut of the batch changes no number."""
    if saved == cfg.micro_batch:
        return
    why = _chunk_dependent(model, cfg)
    if why:
        raise RunError(
            f"--resume {run_dir} cannot change train.micro_batch ({saved} -> {cfg.micro_batch}): "
            f"{why}, so other chunks would train another run; resume with "
            f"train.micro_batch={saved if saved is not None else 'null'}"
        )


def _check_same_precision(
    saved: dict[str, Any], settings: dict[str, Any], recipe: Recipe, run_dir: Path
) -> None:
    """A resume computes in the precision its run started in: ``auto`` resolved to fp32 on one
    machine and bf16 on another would switch precisions mid-run."""
    for key in ("train.precision", "eval.precision"):
        was, now = saved.get(key), settings[key]
        asked = recipe.train.precision if key == "train.precision" else recipe.eval.precision
        if was in ("fp32", "bf16") and was != now and asked == "auto":
            raise RunError(
                f"{run_dir} started in {key} {was}, but auto resolves to {now} on this device: "
                f"the run would switch precision mid-run; write '{key.split('.')[1]}: {was}' "
                f"under {key.split('.')[0]}: in its recipe.yaml to resume as it started, or "
                "start a new run with --out"
            )


def _train(
    recipe: Recipe, run_dir: Path, resume: bool, exp: Experiment, env: DistEnv, method
) -> dict[str, Any]:
    """The run: its setup, then the loop over steps, each epoch's end at the top of the loop."""
    cfg = recipe.train
    # Seeded after the model is built: loading a model draws random numbers (initialisation
    # before the weights arrive), and dropout must not depend on whether it was loaded here or
    # by the caller (flyp compare shares one loaded model across runs).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    ctx = loss_context(exp)
    settings = run_settings(recipe)
    state = load_checkpoint(run_dir / "state.pt") if resume else None
    if state is not None and "settings" in state:  # before recipe.yaml is written again
        _check_same_precision(state["settings"], settings, recipe, run_dir)
        diff = differences(state["settings"], settings)
        if diff:
            raise RunError(
                f"{run_dir} was started with other settings than it is resumed with ({diff}); "
                "put those back in its recipe.yaml, or start a new run with --out (a resume "
                f"may change only {', '.join(RESUME_SETTABLE)})"
            )
    if state is not None:
        _check_micro_batch(state.get("micro_batch", cfg.micro_batch), cfg, exp.bundle.model, run_dir)
    if env.is_main:  # its data where it was found, whatever folder it is read from later
        stored = dataclasses.replace(recipe, data=absolute_roots(recipe.data))
        save_recipe(stored, run_dir / "recipe.yaml")
    classifier, precision = _set_up_classifier(cfg, exp, run_dir, env, method, ctx)
    if method.objective == "none":  # every rank evaluates its share; rank 0 writes
        return _finish_untrained(classifier, exp, run_dir, recipe)
    _place_model(classifier, ctx, cfg, env)
    run = _set_up_loop(cfg, exp, run_dir, env, method, ctx, classifier, precision, settings)
    if state is not None:
        run.resume_from(state)
    run.tracker = open_tracker(recipe, run_dir, env.is_main, run.step)  # _finish closes it
    started = time.time()
    # One loader for the whole run: its workers persist across epochs (the sampler is told each
    # epoch's order); batches pinned for a GPU, copied with non_blocking.
    local_batch = cfg.batch_size // env.world  # batch_size is the global batch
    if isinstance(run.dataset, ShardStream):  # its own sampler (set_epoch); workers per epoch
        sampler = run.dataset
        loader, run.stream_layout = stream_loader(
            sampler, exp.recipe.data.num_workers, env.device, run.stream_layout
        )
    else:
        sampler = EpochSampler(len(run.dataset), local_batch, cfg.seed, 0, 0, env.rank, env.world)
        loader = train_loader(
            run.dataset, sampler, local_batch, exp.recipe.data.num_workers, device=env.device
        )
    steps_per_epoch = run.steps_per_epoch
    while True:
        epoch, done_in_epoch = divmod(run.step, steps_per_epoch)
        if done_in_epoch == 0 and epoch > run.validated:
            # The end of an epoch (also when the run stopped right after its last step and
            # resumes here).
            run.end_epoch(epoch)
        if run.step >= run.total_steps:
            break
        if cfg.stop_after_steps is not None and run.step >= cfg.stop_after_steps:
            run.checkpoint()
            run.tracker.close()
            return {"stopped_at_step": run.step}
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
        progress.begin()
        for images, labels, seeds in bar:
            run.step_on(images, labels, seeds, epoch)
            progress.step(run.step, run.total_steps)
            epoch_images += len(labels) * env.world
            step = run.step
            at_epoch_end = step % steps_per_epoch == 0
            stopping = cfg.stop_after_steps is not None and step >= cfg.stop_after_steps
            saving = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 or stopping
            if step % cfg.log_every == 0 or at_epoch_end or saving:  # a checkpoint after a check
                for value in run.log_pending(bar):
                    epoch_loss, epoch_steps = epoch_loss + value, epoch_steps + 1
            if saving and not at_epoch_end:
                run.train_seconds += time.time() - tick
                tick = time.time()
                run.checkpoint()
            if stopping and not at_epoch_end:
                run.tracker.close()
                return {"stopped_at_step": step}
            if at_epoch_end:
                break  # the epoch-end work (validation, checkpoint) runs at the top of the loop
        run.train_seconds += time.time() - tick
        progress.idle()
        if env.is_main and epoch_steps and run.step % steps_per_epoch == 0:
            seconds = max(time.time() - epoch_started, 1e-9)
            note(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {epoch_loss / epoch_steps:.4f}  "
                f"{epoch_images / seconds:.1f} images/s  elapsed {clock(time.time() - started)}"
            )

    if run.select:  # every rank reads the weights rank 0 kept (the folder every node sees)
        load_weights(classifier, run_dir / "model.safetensors")
    epoch = run.best["epoch"] if run.select else cfg.epochs  # not selecting: the last weights
    # Every rank evaluates its share of each set; rank 0 writes, and every rank returns its
    # metrics (flyp compare and flyp sweep go on from them on every rank).
    return _finish(classifier, exp, run_dir, epoch, started, run.train_seconds, run.images_seen)


# --- setup -------------------------------------------------------------------------------


def _set_up_classifier(
    cfg: TrainConfig, exp: Experiment, run_dir: Path, env: DistEnv, method, ctx: LossContext
) -> tuple[Classifier, Precision]:
    """The model on the run's device in its layout and precision, the method's classifier (a
    probe fitted first for lp and lp-ft), what trains, and the method's loss terms."""
    model = exp.bundle.model
    # Everything the method builds (heads, probe, zero-shot head) is made on the run's device.
    model.to(env.device)
    if prefers_channels_last(model):
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
    if method.objective == "contrastive":  # every caption tokenized now, none in a step
        ctx.caption_table()
    image_names = image_tower_names(model, exp.bundle.image_size)
    set_trainable(method, classifier, image_names, text_tower_names(model, exp.bundle.tokenizer))
    if method.l2sp:
        ctx.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if method.lipsum:  # a frozen copy of the pretrained model: one more model in memory
        ctx.reference = frozen_reference(model)  # before _place_model compiles the towers
        ctx.lipsum_weight, ctx.lipsum_texts = cfg.lipsum_weight, cfg.lipsum_texts
        ctx.lipsum_text = cfg.lipsum_text
        ctx.seed = cfg.seed
    return classifier, precision


def _set_up_loop(
    cfg: TrainConfig,
    exp: Experiment,
    run_dir: Path,
    env: DistEnv,
    method,
    ctx: LossContext,
    classifier: Classifier,
    precision: Precision,
    settings: dict[str, Any],
) -> _Run:
    """The training images, the schedule, AdamW and, with several processes, DDP."""
    model = classifier.model
    # Several processes: DDP averages the gradients in the backward (once per run; the classifier
    # stays the module that is evaluated and saved); the logit scale is averaged by hand.
    ddp, by_hand = ddp_for(classifier, env.device) if env.enabled else (None, [])
    # uint8 from the workers to the device, finished there (flyp.data.loader.finish_pixels)
    split = uint8_transform(exp.bundle.train_transform)
    transform = split[0] if split else exp.bundle.train_transform
    stream = exp.benchmark.stream
    if stream is not None:  # read from the shards as it trains (flyp.data.stream)
        dataset = ShardStream(
            stream, transform, cfg.seed, cfg.batch_size // env.world, env.rank, env.world,
            exp.recipe.data.shuffle_buffer,
        )
        steps_per_epoch = dataset.steps_per_epoch()
    else:
        dataset = ImageDataset(
            exp.benchmark.train,
            transform,
            decoded=exp.train_images.get(exp.benchmark.train, exp.recipe.data.cache_gb),
        )
        steps_per_epoch = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, 0).steps_per_epoch()
    if steps_per_epoch == 0:
        raise RunError(
            f"{exp.benchmark.train_size()} training images do not fill one batch of {cfg.batch_size}; lower train.batch_size"
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
        progress.run_plan(*progress.run_size(exp.recipe, exp.benchmark, True), cfg.batch_size)
        if stream is not None:
            note(stream.summary())
        note(
            f"training {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of {steps_per_epoch} steps (batch {cfg.batch_size}, "
            f"lr {cfg.lr:g} after {warmup} warmup steps)"
        )
        if warmup < cfg.warmup_steps:  # said on a terminal too: the recipe asked for more
            say(
                f"train.warmup_steps={cfg.warmup_steps} is more than half of this run's "
                f"{total_steps} steps; warming up over {warmup} so that it reaches "
                f"train.lr={cfg.lr:g} (set train.warmup_steps to choose)"
            )
    return _Run(
        cfg=cfg,
        exp=exp,
        run_dir=run_dir,
        env=env,
        method=method,
        ctx=ctx,
        classifier=classifier,
        precision=precision,
        settings=settings,
        dataset=dataset,
        pixels=split[1:] if split else None,
        optimizer=optimizer,
        scheduler=scheduler,
        ddp=ddp,
        by_hand=by_hand,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        # The temperature may not go below 1/100 (CLIP's clamp), or the model's own start if
        # that is lower (SigLIP starts near 1/112): a bound that never moves a pretrained model
        # at step 0.
        max_log_scale=max(math.log(cfg.max_logit_scale), float(model.logit_scale.detach())),
        select=cfg.select_on == "val" and exp.recipe.eval.every_epoch,
    )


@dataclass
class _Run:
    """A run in training: what the step, the epoch end and the checkpoint share, and where the
    run is (``step``, ``best``, ``validated``, the counters: what a checkpoint saves besides
    the weights, the optimizer, the schedule and the RNG)."""

    cfg: TrainConfig
    exp: Experiment
    run_dir: Path
    env: DistEnv
    method: Any
    ctx: LossContext
    classifier: Classifier
    precision: Precision
    settings: dict[str, Any]  # what decides the run's numbers: a resume with others is refused
    dataset: ImageDataset | ShardStream
    pixels: tuple | None  # (mean, std) that finish the dataset's uint8 images on the device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ddp: nn.Module | None
    by_hand: list[nn.Parameter]  # averaged over processes after the backward (the logit scale)
    steps_per_epoch: int
    total_steps: int
    max_log_scale: float
    select: bool  # keep the best epoch on ID validation (else the last weights)
    tracker: Any = None
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"val": -1.0, "epoch": 0})
    validated: int = 0  # the last epoch whose end was handled (validation, checkpoint)
    stream_layout: dict | None = None  # a streamed training set's processes and lanes
    train_seconds: float = 0.0
    images_seen: int = 0
    # (step, epoch, lr, loss, temperature) of the steps since the last log point
    pending: list[tuple[int, int, float, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def resume_from(self, state: dict[str, Any]) -> None:
        """Continue where the checkpoint left off: weights, optimizer, schedule, RNG, counters."""
        path = self.run_dir / "state.pt"
        fix = "the run cannot be resumed: start it again in a new run directory"
        load_tensors(self.classifier, state["weights"], path, fix)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: its optimizer or schedule does not fit this run ({err}); {fix}"
            ) from None
        set_rng_state(state["rng"], self.env.device)
        self.step, self.best = state["step"], state["best"]
        self.validated = state.get("validated", self.step // self.steps_per_epoch)
        self.train_seconds, self.images_seen = state["train_seconds"], state["images_seen"]
        self.stream_layout = state.get("stream")  # kept: it decides the stream's batches
        if self.env.is_main:
            truncate_log(self.run_dir / "log.jsonl", self.step)

    # --- the step ----------------------------------------------------------------------------

    def step_on(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor, epoch: int) -> None:
        """One optimisation step on a batch; its loss and temperature stay on the device until
        the next log point (:meth:`log_pending`)."""
        cfg, env, model = self.cfg, self.env, self.classifier.model
        images = images.to(env.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = finish_pixels(images, *self.pixels)
        images = to_model_layout(images, self.classifier.channels_last)
        # labels and seeds stay on the host: forward_backward builds captions from them
        if env.enabled:  # dropout: distinct per rank, and replayed exactly on resume
            torch.manual_seed((cfg.seed * 1_000_003 + self.step) * 4099 + env.rank)
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(
            self.method,
            self.classifier,
            images,
            labels,
            seeds,
            self.step,
            self.ctx,
            micro_batch=cfg.micro_batch,
            precision=self.precision.name,
            gather=gather_batch if env.enabled else None,
            ddp=self.ddp,
        )
        if env.enabled:
            average_gradients(self.by_hand, env.world)
            if cfg.batchnorm == "train":
                broadcast_buffers(self.classifier)  # rank 0's BN statistics
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip
            )
        self.optimizer.step()
        self.scheduler.step()
        if model.logit_scale.requires_grad:  # a frozen scale is the model's own: left as it is
            with torch.no_grad():
                model.logit_scale.clamp_(0, self.max_log_scale)
        self.step += 1
        self.images_seen += len(labels) * env.world  # this rank saw its share of the global batch
        temperature = 1 / model.logit_scale.detach().exp().reshape(())  # SigLIP's is [1]
        lr = self.scheduler.get_last_lr()[0]
        self.pending.append((self.step, epoch + 1, lr, loss, temperature))

    def log_pending(self, bar) -> list[float]:
        """Write the log records of the steps since the last log point, and return their losses.

        The losses and temperatures stay on the device until now and come back in one transfer:
        the host waits for the device once every ``train.log_every`` steps, not at every step.
        A non-finite loss stops the run, naming the first step that gave one (the records
        before it are written; no checkpoint is saved after it, as each waits for this check).
        """
        if not self.pending:
            return []
        numbers = torch.stack([torch.stack((v.float(), t.float())) for *_, v, t in self.pending])
        losses = []
        for (at, in_epoch, lr, *_), (value, temperature) in zip(
            self.pending, numbers.tolist(), strict=True
        ):
            if not math.isfinite(value):
                raise RunError(
                    f"the loss is {value} at step {at}: training diverged and nothing was "
                    f"recorded as finished; lower train.lr (now {self.cfg.lr:g}) "
                    "and start again"
                )
            record = {"step": at, "epoch": in_epoch, "loss": round(value, 6), "lr": lr}
            record["temperature"] = temperature
            if self.env.is_main:
                append_log(self.run_dir / "log.jsonl", record)
                self.tracker.log(record, at)
            losses.append(value)
        self.pending.clear()
        bar.set_postfix(loss=f"{round(losses[-1], 6):.3f}")
        return losses

    # --- the epoch end -----------------------------------------------------------------------

    def end_epoch(self, epoch: int) -> None:
        """Validate (rank 0; every rank holds its choice), keep the best weights, checkpoint."""
        if self.select:
            val = validation_score(self.classifier, self.exp)  # every rank scores its share
            keep = partial(_keep_if_best, self.classifier, self.exp, self.run_dir, self.tracker)
            self.best = on_main(partial(keep, self.best, val, self.step, epoch))
        self.validated = epoch
        self.checkpoint()

    def checkpoint(self) -> None:
        """The weights and everything a resume needs, in one file (rank 0 writes)."""
        if not self.env.is_main:
            return
        save_state(
            {
                "weights": self.classifier.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(self.env.device),
                "step": self.step,
                "best": self.best,
                "validated": self.validated,
                "train_seconds": self.train_seconds,
                "images_seen": self.images_seen,
                "settings": self.settings,  # a resume with other settings is refused
                "micro_batch": self.cfg.micro_batch,  # changed at resume only where no draw differs
                "stream": self.stream_layout,  # data.stream: its processes and lanes
            },
            self.run_dir / "state.pt",
        )


def _keep_if_best(
    classifier: Classifier,
    exp: Experiment,
    run_dir: Path,
    tracker: Any,
    best: dict[str, Any],
    val: float,
    step: int,
    epoch: int,
) -> dict[str, Any]:
    """An epoch's end: its ID validation score ``val`` logged, and the weights kept when they
    are the best so far (the first of equals; NaN never wins). Returns the best {"val", "epoch"}."""
    metric = exp.benchmark.metric
    entry = {"step": step, "epoch": epoch, "val": val, "val_metric": metric}
    append_log(run_dir / "log.jsonl", entry)
    tracker.log(entry, step)
    if best["epoch"] == 0 or val > best["val"]:
        save_weights(classifier, run_dir / "model.safetensors", _metadata(exp, classifier))
        return {"val": val, "epoch": epoch}
    return best


def _finish_untrained(
    classifier: Classifier, exp: Experiment, run_dir: Path, recipe: Recipe
) -> dict[str, Any]:
    """A run that trains nothing (zeroshot, lp): its head evaluated and saved."""
    open_tracker(recipe, run_dir, is_main())  # _finish sends it the metrics and closes it
    return _finish(
        classifier, exp, run_dir, selected_epoch=0, started=time.time(), train_seconds=0.0, images_seen=0
    )


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

    def save() -> None:
        if untrained:
            save_weights(classifier, path, _metadata(exp, classifier, "changed"), changed)
        elif not path.exists() or read_metadata(path) is None:  # selection already wrote it
            save_weights(classifier, path, _metadata(exp, classifier))

    on_main(save)
    tick = time.time()
    sets = evaluate_classifier(classifier, exp, None)  # every rank scores its share
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
        "skipped_links": len(exp.benchmark.skipped_links),
        "precision": _precisions(exp, classifier, untrained),
        # what decides these numbers: a rerun (flyp compare, flyp sweep) or a report checks it
        "settings": run_settings(exp.recipe),
        "fingerprint": fingerprint(run_settings(exp.recipe)),
    }

    def write() -> dict[str, Any]:  # rank 0's metrics (its timings) for every rank
        atomic_write_json(run_dir / "metrics.json", metrics)
        (run_dir / "state.pt").unlink(missing_ok=True)
        finish_tracker(run_dir, metrics)  # the final metrics to TensorBoard / W&B (train.log_to)
        return metrics

    return on_main(write)
