"""Training and evaluation: fit, evaluate (whole image, sliding window, multi-scale + flip),
checkpoints written atomically, resume that continues exactly where the run stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
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
from danet.config import EvalConfig, RunConfig
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
    batches of an epoch are dropped (BatchNorm dislikes tiny batches).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if size < batch_size:
            raise ValueError(f"--batch-size {batch_size} is larger than the training set ({size} images)")
        if batch_size % world_size:
            raise ValueError(f"--batch-size {batch_size} (the global batch) must divide among {world_size} ranks")
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


def batches_per_epoch(dataset_size: int, batch_size: int) -> int:
    return max(1, dataset_size // batch_size)


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
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def fit(cfg: RunConfig, model: DANet, data: DataBundle, tracker: Tracker, checkpoint_dir: Path,
        resume: dict[str, Any] | None = None, on_eval: Callable[[int, float], None] | None = None,
        context: distributed.Context = distributed.SINGLE) -> FitResult:
    """Train `model` for cfg.train.iterations, validating and checkpointing on the way.

    `resume` is a loaded checkpoint to continue from. `on_eval(iteration, miou)` is called after
    each periodic validation (sweep drivers use it for pruning; it may raise StopRun to end the
    run). Under torchrun (`context`), each rank trains its slice of every global batch through
    DistributedDataParallel and validates its share of the images (confusion matrices summed);
    only rank 0 writes checkpoints, and `tracker` should be a NullTracker on the other ranks.
    """
    train = cfg.train
    device = distributed.device_for(context, pick_device(train.device))
    seed_everything(train.seed + context.rank)  # dropout differs per rank; the weights come from rank 0
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    network: torch.nn.Module = model
    if context.enabled:
        if train.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if train.amp_dtype == "bfloat16" else torch.float16
    autocast = {"device_type": device.type, "dtype": amp_dtype, "enabled": use_amp}

    optimizer = torch.optim.SGD(model.param_groups(train.lr, train.head_lr_multiplier), lr=train.lr,
                                momentum=train.momentum, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / train.iterations) ** train.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = SegmentationLoss(cfg.model.loss_weights())

    iteration, best_miou = 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        iteration, best_miou = resume["iteration"], resume["best_miou"]
        _set_rng_state(resume["rng"])  # rank 0's state, saved by rank 0
        if context.rank:  # the other ranks draw their own dropout masks again
            torch.manual_seed(train.seed + context.rank + 7919 * iteration)

    def checkpoint(name: str) -> None:
        if not context.is_main:
            return
        save_checkpoint(checkpoint_dir / f"{name}.pt", model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), iteration=iteration,
                        best_miou=best_miou, config=cfg.to_dict(), rng=_rng_state())

    def checkpoint_after_validation(miou: float) -> None:
        """Save "best" when this validation beats the best so far, then "last"."""
        nonlocal best_miou
        if best_miou is None or miou > best_miou:
            best_miou = miou
            checkpoint("best")
        checkpoint("last")

    sampler = SeededBatchSampler(len(data.train), cfg.data.batch_size, train.seed, iteration, train.iterations,
                                 context.rank, context.world_size)
    loader_options = {"num_workers": cfg.data.workers, "pin_memory": device.type == "cuda",
                      "persistent_workers": False}
    train_loader = DataLoader(data.train, batch_sampler=sampler,
                              generator=torch.Generator().manual_seed(train.seed), **loader_options)
    val_share = Subset(data.val, range(context.rank, len(data.val), context.world_size))
    val_loader = DataLoader(val_share, batch_size=cfg.eval.eval_batch_size, shuffle=False, **loader_options)
    periodic = dataclasses.replace(cfg.eval, eval_scales=(1.0,), eval_flip=False)

    progress = make_progress(cfg.tracking.quiet or not context.is_main)
    images_seen, eval_seconds, loop_start = 0, 0.0, time.perf_counter()
    model.train()
    with progress or contextlib.nullcontext():
        task = progress.add_task("training", total=train.iterations, completed=iteration, info="") if progress else None
        window_start, window_images = time.perf_counter(), 0
        for images, labels in train_loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(**autocast):
                outputs = network(images)
            loss = loss_fn(outputs, labels)
            loss_value = distributed.mean(loss.total, context)  # the same on every rank
            if not math.isfinite(loss_value):
                terms = ", ".join(f"{name} {float(value):.4g}" for name, value in loss.terms.items())
                raise NonFiniteLoss(f"non-finite loss at iteration {iteration + 1} ({terms})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss.total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            images_seen += images.shape[0]
            window_images += images.shape[0]

            if iteration % train.log_every == 0 or iteration == train.iterations:
                now = time.perf_counter()
                metrics = {"train/loss": loss_value, "train/lr": optimizer.param_groups[0]["lr"],
                           "train/images_per_s": context.world_size * window_images / max(now - window_start, 1e-9)}
                metrics |= {f"train/loss_{name}": float(value) for name, value in loss.terms.items()}
                tracker.log(iteration, metrics)
                window_start, window_images = now, 0
                if progress:
                    progress.update(task, info=f"loss {loss_value:.3f}")
            if progress:
                progress.advance(task)

            if train.eval_every and iteration % train.eval_every == 0 and iteration < train.iterations:
                eval_start = time.perf_counter()
                scores, samples = evaluate(model, val_loader, periodic, data.num_classes, device, autocast, progress,
                                           keep_samples=PREDICTIONS_LOGGED)
                tracker.log(iteration, scores.as_metrics(data.class_names, "val") | attention_gammas(model))
                tracker.log_predictions(iteration, samples, data.class_names)
                checkpoint_after_validation(scores.miou)
                eval_seconds += time.perf_counter() - eval_start
                window_start = time.perf_counter()
                stop_reason = None
                if on_eval and context.is_main:
                    try:
                        on_eval(iteration, scores.miou)
                    except StopRun as stop:
                        stop_reason = str(stop)
                stop_reason = distributed.broadcast(stop_reason, context)  # every rank stops together
                if stop_reason:
                    raise StopRun(stop_reason)
            elif iteration % train.checkpoint_every == 0:
                checkpoint("last")

        train_seconds = time.perf_counter() - loop_start - eval_seconds
        final, samples = evaluate(model, val_loader, cfg.eval, data.num_classes, device, autocast, progress,
                                  keep_samples=PREDICTIONS_LOGGED)
    tracker.log(iteration, final.as_metrics(data.class_names, "val") | final.as_metrics(data.class_names, "final")
                | attention_gammas(model))
    tracker.log_predictions(iteration, samples, data.class_names)
    checkpoint_after_validation(final.miou)
    return FitResult(best_miou, final, iteration, context.world_size * images_seen / max(train_seconds, 1e-9),
                     train_seconds)
