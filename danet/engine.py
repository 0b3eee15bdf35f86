"""Training and evaluation: fit, evaluate (whole image, sliding window, multi-scale + flip),
checkpoints written atomically, resume that continues exactly where the run stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset

from danet import distributed
from danet.config import EvalConfig, RunConfig, TrainConfig
from danet.console import stderr_console
from danet.data import DataBundle
from danet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from danet.losses import SegmentationLoss
from danet.metrics import ConfusionMatrix, SegmentationScores
from danet.models import DANet
from danet.models.attention import ChannelAttention, PositionAttention
from danet.tracking import Tracker

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "best_miou", "config", "rng")
PREDICTIONS_LOGGED = 4


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops and is recorded as failed."""


class StopRun(Exception):
    """Raised by an `on_eval` hook to end a run early (a sweep driver pruning it)."""


class Preempted(Exception):
    """A stop was requested (SIGTERM, a scheduler's warning signal): the run checkpointed its
    current iteration and can continue from there."""


# Set by a signal handler (`request_stop`), honoured by fit at the next step boundary, where the
# state is consistent: a checkpoint taken there lets the run continue exactly.
STOP_REQUEST = threading.Event()


def request_stop(signum: int, frame: Any) -> None:
    STOP_REQUEST.set()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of workers and resumes."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededBatchSampler(Sampler):
    """Batches of (index, augmentation seed) from iteration `start` to `stop`.

    Each epoch is a permutation drawn from (seed, epoch), so batch i of the run is the same
    whether the run went straight through or was resumed at any iteration. Incomplete last
    batches of an epoch are dropped (BatchNorm dislikes tiny batches). The batch fits in the
    dataset and divides among the ranks: `config.resolve_for_dataset` checks both.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop
        self.batches_per_epoch = size // batch_size
        # under torchrun each rank takes its contiguous slice of the same global batch
        per_rank = batch_size // world_size
        self.share = slice(rank * per_rank, (rank + 1) * per_rank)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for iteration in range(self.start, self.stop):
            if iteration // self.batches_per_epoch != epoch:
                epoch = iteration // self.batches_per_epoch
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            offset = (iteration % self.batches_per_epoch) * self.batch_size
            batch = order[offset:offset + self.batch_size][self.share]
            yield [(int(i), sample_seed(self.seed, epoch, int(i))) for i in batch]


# ---------------------------------------------------------------------------------------------
# Prediction under a test protocol


def _forward_logits(model: DANet, images: torch.Tensor) -> torch.Tensor:
    return model(images)["out"].float()


def sliding_window_logits(model: DANet, images: torch.Tensor, window: int, stride: int,
                          num_classes: int) -> torch.Tensor:
    """Logits averaged over overlapping windows; images smaller than a window are padded."""
    batch, _, height, width = images.shape
    pad_h, pad_w = max(window - height, 0), max(window - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = padded.shape[-2:]
    logits = images.new_zeros(batch, num_classes, full_h, full_w, dtype=torch.float32)
    counts = images.new_zeros(1, 1, full_h, full_w, dtype=torch.float32)
    tops = list(range(0, full_h - window + 1, stride))
    lefts = list(range(0, full_w - window + 1, stride))
    tops += [full_h - window] if tops[-1] != full_h - window else []
    lefts += [full_w - window] if lefts[-1] != full_w - window else []
    for top in tops:
        for left in lefts:
            crop = padded[..., top:top + window, left:left + window]
            logits[..., top:top + window, left:left + window] += _forward_logits(model, crop)
            counts[..., top:top + window, left:left + window] += 1
    return (logits / counts)[..., :height, :width]


def predict_probabilities(model: DANet, images: torch.Tensor, protocol: EvalConfig, num_classes: int) -> torch.Tensor:
    """Class probabilities averaged over the protocol's scales (and flips), at input size."""
    size = images.shape[-2:]
    total = None
    flips = (False, True) if protocol.eval_flip else (False,)
    for scale in protocol.eval_scales:
        scaled = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                           align_corners=True)
        for flip in flips:
            inputs = scaled.flip(-1) if flip else scaled
            if protocol.eval_mode == "slide":
                logits = sliding_window_logits(model, inputs, protocol.eval_window, protocol.eval_stride, num_classes)
            else:
                logits = _forward_logits(model, inputs)
            probabilities = logits.softmax(dim=1)
            if flip:
                probabilities = probabilities.flip(-1)
            if scale != 1.0:
                probabilities = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=True)
            total = probabilities if total is None else total + probabilities
    return total / (len(protocol.eval_scales) * len(flips))


def _denormalize(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image.cpu().float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def evaluate(model: DANet, loader: DataLoader, protocol: EvalConfig, num_classes: int, device: torch.device,
             autocast: dict[str, Any], progress: Progress | None = None,
             keep_samples: int = 0) -> tuple[SegmentationScores, list]:
    """Scores over a loader, and up to `keep_samples` (image, prediction, label) triples."""
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    samples = []
    task = progress.add_task("validating", total=len(loader), info="") if progress else None
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(**autocast):
            prediction = predict_probabilities(model, images, protocol, num_classes).argmax(dim=1)
        confusion.update(prediction, labels)
        for image, predicted, label in zip(images, prediction, labels):
            if len(samples) < keep_samples:
                samples.append((_denormalize(image), predicted.byte().cpu().numpy(), label.byte().cpu().numpy()))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute(), samples


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, **state: Any) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class FitResult:
    best_miou: float | None
    final: SegmentationScores
    iterations: int
    images_per_second: float
    train_seconds: float  # wall time of the training loop, data loading included, validation not


def attention_gammas(model: DANet) -> dict[str, float]:
    gammas = {}
    for module in model.modules():
        if isinstance(module, PositionAttention):
            gammas["gamma/pam"] = module.gamma.item()
        elif isinstance(module, ChannelAttention):
            gammas["gamma/cam"] = module.gamma.item()
    return gammas


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; whole process


def make_progress(quiet: bool) -> Progress | None:
    if quiet:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False, console=stderr_console())


def autocast_options(train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """torch.autocast arguments: mixed precision on CUDA when asked for, off elsewhere."""
    dtype = torch.bfloat16 if train.amp_dtype == "bfloat16" else torch.float16
    return {"device_type": device.type, "dtype": dtype, "enabled": train.amp and device.type == "cuda"}


@dataclass
class Training:
    """The state of a training run: what a checkpoint holds, and what each step uses."""

    cfg: RunConfig
    model: DANet  # the bare model: state dicts and checkpoints
    network: torch.nn.Module  # what a step calls: the model, or its DistributedDataParallel wrapper
    device: torch.device
    memory_format: torch.memory_format
    autocast: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: SegmentationLoss
    context: distributed.Context
    iteration: int = 0
    best_miou: float | None = None


def set_up_training(cfg: RunConfig, model: DANet, context: distributed.Context) -> Training:
    """Device, DDP wrapper, mixed precision, SGD with the poly schedule, the loss."""
    train = cfg.train
    device = distributed.device_for(context, pick_device(train.device))
    seed_everything(train.drawn_seed + context.rank)  # dropout differs per rank; the weights come from rank 0
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    network: torch.nn.Module = model
    if context.enabled:
        if train.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_options(train, device)
    optimizer = torch.optim.SGD(model.param_groups(train.lr, train.head_lr_multiplier), lr=train.lr,
                                momentum=train.momentum, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / train.iterations) ** train.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast["enabled"] and autocast["dtype"] == torch.float16)
    return Training(cfg, model, network, device, memory_format, autocast, optimizer, scheduler, scaler,
                    SegmentationLoss(cfg.model.loss_weights()), context)


def restore(training: Training, checkpoint: dict[str, Any]) -> None:
    """Continue from a loaded checkpoint: weights, optimizer, schedule, scaler, counters, RNGs."""
    training.model.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    training.scaler.load_state_dict(checkpoint["scaler"])
    training.iteration, training.best_miou = checkpoint["iteration"], checkpoint["best_miou"]
    _set_rng_state(checkpoint["rng"])  # rank 0's state, saved by rank 0
    rank = training.context.rank
    if rank:  # the other ranks draw their own dropout masks again
        torch.manual_seed(training.cfg.train.drawn_seed + rank + 7919 * training.iteration)


def save_training(training: Training, path: Path) -> None:
    """The checkpoint of the whole training state (rank 0 only; other ranks do nothing)."""
    if training.context.is_main:
        save_checkpoint(path, model=training.model.state_dict(), optimizer=training.optimizer.state_dict(),
                        scheduler=training.scheduler.state_dict(), scaler=training.scaler.state_dict(),
                        iteration=training.iteration, best_miou=training.best_miou, config=training.cfg.to_dict(),
                        rng=_rng_state())


def train_step(training: Training, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One SGD step on a batch; returns the loss (averaged over ranks) and its unweighted terms."""
    images = images.to(training.device, non_blocking=True).contiguous(memory_format=training.memory_format)
    labels = labels.to(training.device, non_blocking=True)
    with torch.autocast(**training.autocast):
        outputs = training.network(images)
    loss = training.loss_fn(outputs, labels)
    loss_value = distributed.mean(loss.total, training.context)  # the same on every rank
    if not math.isfinite(loss_value):
        shown = ", ".join(f"{name} {float(value):.4g}" for name, value in loss.terms.items())
        raise NonFiniteLoss(f"non-finite loss at iteration {training.iteration + 1} ({shown})")
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss.total).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.scheduler.step()
    training.iteration += 1
    return loss_value, loss.terms


def training_metrics(training: Training, loss: float, terms: dict[str, torch.Tensor],
                     images_per_second: float) -> dict[str, float]:
    return {"train/loss": loss, "train/lr": training.optimizer.param_groups[0]["lr"],
            "train/images_per_s": images_per_second} | {f"train/loss_{name}": float(value) for name, value in terms.items()}


def announcer(progress: Progress | None, context: distributed.Context) -> Callable[[str], None]:
    """Where a run's plain lines go: above the progress bar, or to stderr when there is none (--quiet,
    agents' logs); rank 0 only."""
    if not context.is_main:
        return lambda line: None
    if progress is not None:
        return lambda line: progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
    return lambda line: print(line, file=sys.stderr, flush=True)


def record_validation(training: Training, miou: float, checkpoint_dir: Path, say: Callable[[str], None],
                      label: str = "val mIoU") -> None:
    """After a validation: save "best" when it beats the best so far, then "last"; say one line."""
    if training.best_miou is None or miou > training.best_miou:
        training.best_miou = miou
        save_training(training, checkpoint_dir / "best.pt")
    save_training(training, checkpoint_dir / "last.pt")
    say(f"iteration {training.iteration}/{training.cfg.train.iterations}: {label} {miou:.4f} "
        f"(best so far {training.best_miou:.4f})")


def honour_stop_request(training: Training, checkpoint_dir: Path) -> None:
    """When a stop was requested on any rank: checkpoint this iteration, then raise Preempted."""
    if distributed.any_rank(STOP_REQUEST.is_set(), training.context, training.device):
        save_training(training, checkpoint_dir / "last.pt")
        raise Preempted(f"stopped by a signal at iteration {training.iteration} (checkpointed); "
                        "continue with --resume")


def agree_to_stop(on_eval: Callable[[int, float], None] | None, iteration: int, miou: float,
                  context: distributed.Context) -> None:
    """Ask the sweep driver's hook (rank 0) whether to stop; every rank stops together (StopRun)."""
    reason = None
    if on_eval and context.is_main:
        try:
            on_eval(iteration, miou)
        except StopRun as stop:
            reason = str(stop)
    reason = distributed.broadcast(reason, context)
    if reason:
        raise StopRun(reason)


def data_loaders(cfg: RunConfig, data: DataBundle, training: Training) -> tuple[DataLoader, DataLoader]:
    """Training batches from the current iteration on (resumable), and this rank's share of val."""
    context, seed = training.context, cfg.train.drawn_seed
    sampler = SeededBatchSampler(len(data.train), cfg.data.batch_size, seed, training.iteration,
                                 cfg.train.iterations, context.rank, context.world_size)
    options = {"num_workers": cfg.data.workers, "pin_memory": training.device.type == "cuda",
               "persistent_workers": False}
    train_loader = DataLoader(data.train, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed),
                              **options)
    val_share = Subset(data.val, range(context.rank, len(data.val), context.world_size))
    return train_loader, DataLoader(val_share, batch_size=cfg.eval.eval_batch_size, shuffle=False, **options)


def fit(cfg: RunConfig, model: DANet, data: DataBundle, tracker: Tracker, checkpoint_dir: Path,
        from_checkpoint: dict[str, Any] | None = None, on_eval: Callable[[int, float], None] | None = None,
        context: distributed.Context = distributed.SINGLE) -> FitResult:
    """Train `model` for cfg.train.iterations (from a loaded checkpoint, if given), validating and
    checkpointing on the way. `on_eval(iteration, miou)` follows each periodic validation (sweep
    drivers prune with it: it may raise StopRun). Under torchrun (`context`) each rank trains its
    slice of every global batch through DDP and validates its share of the images; only rank 0
    writes checkpoints, and `tracker` should be a NullTracker on the other ranks.
    """
    train, classes = cfg.train, data.class_names
    training = set_up_training(cfg, model, context)
    if from_checkpoint is not None:
        restore(training, from_checkpoint)
    train_loader, val_loader = data_loaders(cfg, data, training)
    periodic = dataclasses.replace(cfg.eval, eval_scales=(1.0,), eval_flip=False)

    def validate(protocol: EvalConfig) -> tuple[SegmentationScores, list]:
        return evaluate(model, val_loader, protocol, data.num_classes, training.device, training.autocast, progress,
                        keep_samples=PREDICTIONS_LOGGED)

    progress = make_progress(cfg.tracking.quiet or not context.is_main)
    say = announcer(progress, context)
    images_seen, eval_seconds, loop_start = 0, 0.0, time.perf_counter()
    model.train()
    with progress or contextlib.nullcontext():
        task = progress.add_task("training", total=train.iterations, completed=training.iteration, info="") \
            if progress else None
        window_start, window_images = time.perf_counter(), 0
        for images, labels in train_loader:
            loss, terms = train_step(training, images, labels)
            iteration = training.iteration
            images_seen, window_images = images_seen + images.shape[0], window_images + images.shape[0]
            if iteration % train.log_every == 0 or iteration == train.iterations:
                now = time.perf_counter()
                speed = context.world_size * window_images / max(now - window_start, 1e-9)
                tracker.log(iteration, training_metrics(training, loss, terms, speed))
                window_start, window_images = now, 0
            if progress:
                progress.update(task, advance=1, info=f"loss {loss:.3f}")

            if train.eval_every and iteration % train.eval_every == 0 and iteration < train.iterations:
                eval_start = time.perf_counter()
                scores, samples = validate(periodic)
                tracker.log(iteration, scores.as_metrics(classes, "val") | attention_gammas(model))
                tracker.log_predictions(iteration, samples, classes)
                record_validation(training, scores.miou, checkpoint_dir, say)
                eval_seconds += (window_start := time.perf_counter()) - eval_start  # the window restarts after it
                agree_to_stop(on_eval, iteration, scores.miou, context)
            elif iteration % train.checkpoint_every == 0:
                save_training(training, checkpoint_dir / "last.pt")
            honour_stop_request(training, checkpoint_dir)

        train_seconds = time.perf_counter() - loop_start - eval_seconds
        final, samples = validate(cfg.eval)
    tracker.log(training.iteration, final.as_metrics(classes, "val") | final.as_metrics(classes, "final")
                | attention_gammas(model))
    tracker.log_predictions(training.iteration, samples, classes)
    record_validation(training, final.miou, checkpoint_dir, say, f"final {cfg.eval.protocol_name()} val mIoU")
    return FitResult(training.best_miou, final, training.iteration,
                     context.world_size * images_seen / max(train_seconds, 1e-9), train_seconds)
