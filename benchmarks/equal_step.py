"""flyp's FLYP step against open_clip_train's, at equal work, in one process: where a gap is.

`train_speed.py` compares whole runs in separate processes; on a 2-core machine their rounds
spread by ±10%, wider than the gap it looks for. This script splits the step in two and times
each half side by side in one process, alternating, on one thread, in CPU time (process time,
which a neighbour's load changes far less than the wall clock):

- **compute**: the same batch (decoded once), the same initial weights (one model, deep-copied),
  fp32, 77-token captions, every caption encoded. open_clip_train's step is rebuilt from its
  own parts: `model(images, texts)`, `open_clip.ClipLoss`, AdamW with its parameter groups
  (no weight decay on gains, biases, the scale), zero_grad, backward, step, the scale clamp.
  flyp's is `flyp.train`'s: `flyp.gradcache.forward_backward` with method `flyp`, AdamW over
  `flyp.train.param_groups` fused as flyp runs it (`train.fused_optimizer`, on by default; the
  same update), a cosine scheduler step and the scale clamp. First the gradients of
  one step of each are compared (they should agree to float rounding);
- **data**: one batch of PACS photo from disk, decoded and augmented with the model's training
  transform, no workers: flyp's `ImageDataset` + `EpochSampler` loader (per-sample augmentation
  seeds) against open_clip_train's `CsvDataset` (which also tokenizes each caption) in a
  DataLoader. Needs open_clip_train's pandas (`--extra-path`, as train_speed.py).

  OPEN_CLIP_TRAIN_DEPS=/tmp/octrain_deps .venv/bin/python benchmarks/equal_step.py --rounds 12

Prints per half the median CPU ms per step of each, their ratio, and the rounds' spread.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
if os.environ.get("OPEN_CLIP_TRAIN_DEPS"):
    sys.path.append(os.environ["OPEN_CLIP_TRAIN_DEPS"])

import torch  # noqa: E402
from _common import pacs_photo, write_csv  # noqa: E402

CONFIG = HERE / "configs" / "flyp-bench-vit.json"


def open_clip_optimizer(model: torch.nn.Module, lr: float = 1e-5, wd: float = 0.2):
    """open_clip_train's AdamW: no decay on 1-d parameters, norms, biases and the scale."""
    plain, decayed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (plain if skip else decayed).append(p)
    groups = [{"params": plain, "weight_decay": 0.0}, {"params": decayed, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def build(args: argparse.Namespace):
    import open_clip

    from flyp.data.folders import Sample
    from flyp.data.loader import EpochSampler, ImageDataset, train_loader
    from flyp.gradcache import forward_backward
    from flyp.methods import Classifier, LossContext, get_method
    from flyp.models import load_model
    from flyp.recipe import TrainConfig
    from flyp.train import param_groups

    torch.manual_seed(0)
    bundle = load_model(f"open_clip:{CONFIG}", context_length=77)
    rows = pacs_photo(args.batch * 4)
    captions = sorted({c for _, c, _ in rows})
    class_names = [c.removeprefix("a photo of a ").removesuffix(".") for c in captions]
    label_of = {c: i for i, c in enumerate(captions)}
    samples = [Sample(p, label_of[c]) for p, c, _ in rows]
    batch_rows = rows[: args.batch]
    images = torch.stack([bundle.train_transform(load(p)) for p, _, _ in batch_rows])
    labels = torch.tensor([label_of[c] for _, c, _ in batch_rows])
    seeds = torch.zeros(args.batch, dtype=torch.long)

    # open_clip_train's side: its own model call, loss and optimizer
    oc_model = copy.deepcopy(bundle.model)
    oc_model.output_dict = True
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the CLIP BPE, 77 tokens
    texts = tokenizer([c for _, c, _ in batch_rows])
    oc_loss = open_clip.ClipLoss()
    oc_opt = open_clip_optimizer(oc_model)

    def oc_step() -> None:
        oc_opt.zero_grad()
        out = oc_model(images, texts)
        total = sum(oc_loss(**out, output_dict=True).values())
        total.backward()
        oc_opt.step()
        with torch.no_grad():
            oc_model.logit_scale.clamp_(0, math.log(100))

    # flyp's side: flyp.train's step (forward_backward, AdamW, scheduler, clamp)
    classifier = Classifier(copy.deepcopy(bundle.model))
    ctx = LossContext(bundle.tokenizer, class_names, ["a photo of a {}."], unique_captions=False)
    ctx.caption_table()
    cfg = TrainConfig(precision="fp32")
    # flyp.train's optimizer: fused AdamW (train.fused_optimizer, on by default): the same
    # update as torch's per-tensor loop in one kernel
    f_opt = torch.optim.AdamW(param_groups(classifier, cfg), lr=1e-5, fused=cfg.fused_optimizer)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(f_opt, T_max=10_000)
    method = get_method("flyp")
    steps = [0]

    def flyp_step() -> None:
        f_opt.zero_grad(set_to_none=True)
        forward_backward(method, classifier, images, labels, seeds, steps[0], ctx, precision="fp32")
        f_opt.step()
        sched.step()
        with torch.no_grad():
            classifier.model.logit_scale.clamp_(0, math.log(100))
        steps[0] += 1

    # data: one batch from disk each
    loader = train_loader(
        ImageDataset(samples, bundle.train_transform),
        EpochSampler(len(samples), args.batch, 0, 0),
        args.batch,
        0,
    )
    flyp_batches = iter_forever(loader)
    oc_batches = None
    try:
        from open_clip_train.data import CsvDataset

        tmp = tempfile.mkdtemp()
        csv = write_csv(rows, Path(tmp) / "t.csv")
        dataset = CsvDataset(
            str(csv), bundle.train_transform, "filepath", "title", sep="\t", tokenizer=tokenizer
        )
        oc_batches = iter_forever(
            torch.utils.data.DataLoader(
                dataset, batch_size=args.batch, shuffle=True, drop_last=True
            )
        )
    except ImportError as err:
        print(
            f"(data half skipped: open_clip_train's CsvDataset needs {err.name}; "
            "set OPEN_CLIP_TRAIN_DEPS)"
        )

    def gradients_agree() -> float:
        """Largest relative difference of the two sides' gradients after one step's backward."""
        oc_opt.zero_grad()
        sum(oc_loss(**oc_model(images, texts), output_dict=True).values()).backward()
        f_opt.zero_grad(set_to_none=True)
        forward_backward(method, classifier, images, labels, seeds, 0, ctx, precision="fp32")
        worst = 0.0
        theirs = dict(oc_model.named_parameters())
        for name, p in classifier.model.named_parameters():
            q = theirs[name]
            if p.grad is None or q.grad is None:
                continue
            scale = q.grad.abs().max().item() or 1.0
            worst = max(worst, (p.grad - q.grad).abs().max().item() / scale)
        return worst

    halves = {"compute": (flyp_step, oc_step)}
    if oc_batches is not None:
        halves["data"] = (lambda: next(flyp_batches), lambda: next(oc_batches))
    return halves, gradients_agree


def load(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def iter_forever(loader):
    while True:
        yield from loader


def cpu_ms(work, steps: int) -> float:
    """Median process-time of ``steps`` calls, in ms."""
    times = []
    for _ in range(steps):
        start = time.process_time()
        work()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument(
        "--data-steps", type=int, default=12, help="timed batches per side per round"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    halves, gradients_agree = build(args)
    print(
        f"gradients of one step, largest difference relative to the tensor's: "
        f"{gradients_agree():.2e}"
    )
    for name, (flyp_work, oc_work) in halves.items():
        flyp_work(), oc_work()  # warm-up
        ratios, ours, theirs = [], [], []
        for r in range(args.rounds):
            order = [(flyp_work, ours), (oc_work, theirs)]
            for work, into in order if r % 2 == 0 else order[::-1]:
                into.append(cpu_ms(work, args.steps if name == "compute" else args.data_steps))
            ratios.append(theirs[-1] / ours[-1])
        print(
            f"{name}: flyp {statistics.median(ours):.1f} ms, open_clip_train "
            f"{statistics.median(theirs):.1f} ms CPU per batch of {args.batch}; "
            f"flyp / open_clip_train speed {statistics.median(ratios):.3f}x "
            f"(rounds {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
