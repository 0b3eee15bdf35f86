"""Typed configuration: frozen dataclasses that round-trip to and from plain dicts.

Unknown keys and wrong types are errors (ValueError naming the key), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from danet.models.attention import CAM_ENERGIES, PAM_IMPLS
from danet.models.backbone import BACKBONES, OUTPUT_STRIDES

Section = TypeVar("Section")


def _check_type(owner: str, name: str, value: Any, expected: Any) -> Any:
    """Return `value` as the annotated type, or raise ValueError naming the field."""
    if typing.get_origin(expected) is tuple:  # tuple[float, ...]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{owner}.{name} must be a non-empty list, got {value!r}")
        element = typing.get_args(expected)[0]
        return tuple(_check_type(owner, name, item, element) for item in value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (bool, int, float, str):
        # bool is a subclass of int: True must not pass as an int field
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
    else:
        raise TypeError(f"unsupported annotation {expected!r} on {owner}.{name}")
    raise ValueError(f"{owner}.{name} must be {expected.__name__}, got {value!r}")


def section_from_dict(cls: type[Section], data: dict[str, Any]) -> Section:
    """Build a config dataclass from a plain dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(names)}")
    values = {name: _check_type(cls.__name__, name, value, hints[name]) for name, value in data.items()}
    return cls(**values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Every switch of the model. Defaults are the released DANet code's (ResNet-50, OS 8)."""

    backbone: str = "resnet50"
    weights: str = "none"  # "none", "imagenet" or a path to a torchvision ResNet state dict
    output_stride: int = 8
    multi_grid: bool = False
    pam: bool = True
    cam: bool = True
    pam_reduction: int = 8  # query/key width C / reduction; 1 is the paper's unreduced form
    pam_impl: str = "fused"
    cam_energy: str = "code"  # "code": softmax(rowmax(E) - E) as released; "paper": softmax(E)
    aux: bool = True  # PAM / CAM branch classifiers and their loss terms
    fcn_aux: bool = False  # FCN head on stage 3 (mmseg's auxiliary head)
    loss_weight_pam: float = 1.0
    loss_weight_cam: float = 1.0
    loss_weight_aux: float = 0.4
    num_classes: int = 0  # 0: the dataset's class count, filled in when the run config is resolved
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _require(self.backbone in BACKBONES,
                 f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        _require(self.output_stride in OUTPUT_STRIDES,
                 f"output_stride must be one of {list(OUTPUT_STRIDES)}, got {self.output_stride!r}")
        _require(self.pam_reduction >= 1, f"pam_reduction must be >= 1, got {self.pam_reduction!r}")
        _require(self.pam_impl in PAM_IMPLS, f"pam_impl must be one of {list(PAM_IMPLS)}, got {self.pam_impl!r}")
        _require(self.cam_energy in CAM_ENERGIES,
                 f"cam_energy must be one of {list(CAM_ENERGIES)}, got {self.cam_energy!r}")
        _require(self.num_classes >= 0, f"num_classes must be >= 0 (0: from the dataset), got {self.num_classes!r}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("loss_weight_pam", "loss_weight_cam", "loss_weight_aux"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return section_from_dict(cls, data)

    def loss_weights(self) -> dict[str, float]:
        """Weight of each output the model produces under this config, keyed like its outputs."""
        weights = {"out": 1.0}
        if self.aux and self.pam:
            weights["pam"] = self.loss_weight_pam
        if self.aux and self.cam:
            weights["cam"] = self.loss_weight_cam
        if self.fcn_aux:
            weights["aux"] = self.loss_weight_aux
        return weights


DATASETS = ("synthetic", "camvid", "cityscapes", "voc")
WANDB_MODES = ("online", "offline", "disabled")
EVAL_MODES = ("whole", "slide")


@dataclass(frozen=True)
class DataConfig:
    """Dataset, its location and the training augmentation (albumentations)."""

    dataset: str = "synthetic"
    data_root: str = ""  # required for real datasets (or the DANET_DATA environment variable)
    train_split: str = "train"
    val_split: str = "val"
    image_scale: float = 1.0  # images and labels resized by this factor first (reduced-resolution runs)
    crop_size: int = 64  # random training crop (padded with image 0 / label 255 when larger)
    random_scale: bool = False  # the paper's "DA": random rescale before the crop
    scale_min: float = 0.75
    scale_max: float = 2.0
    hflip: bool = True
    batch_size: int = 8
    workers: int = 2  # DataLoader worker processes; results do not depend on it
    synthetic_size: int = 64  # side of the synthetic images
    synthetic_train_images: int = 2048
    synthetic_val_images: int = 64

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, f"dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        _require(self.image_scale > 0, f"image_scale must be > 0, got {self.image_scale!r}")
        _require(self.crop_size >= 8, f"crop_size must be >= 8, got {self.crop_size!r}")
        _require(0 < self.scale_min <= self.scale_max,
                 f"need 0 < scale_min <= scale_max, got {self.scale_min!r} and {self.scale_max!r}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        _require(self.workers >= 0, f"workers must be >= 0, got {self.workers!r}")
        _require(self.synthetic_size >= 32, f"synthetic_size must be >= 32, got {self.synthetic_size!r}")
        _require(self.synthetic_train_images >= 1 and self.synthetic_val_images >= 1,
                 "synthetic_train_images and synthetic_val_images must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (the paper's recipe by default), schedule of logs, evaluations and checkpoints."""

    iterations: int = 1000
    epochs: int = 0  # when > 0, replaces iterations by epochs x batches per epoch
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    head_lr_multiplier: float = 10.0
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    amp_dtype: str = "bfloat16"  # or "float16" (then with a gradient scaler)
    channels_last: bool = False
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    log_every: int = 10
    eval_every: int = 200  # periodic validation (whole image, one scale); 0: only the final one
    checkpoint_every: int = 100  # iterations between "last" checkpoints (also written at every eval)

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations!r}")
        _require(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs!r}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _require(self.amp_dtype in ("bfloat16", "float16"),
                 f"amp_dtype must be one of ['bfloat16', 'float16'], got {self.amp_dtype!r}")
        for name in ("log_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        _require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")


@dataclass(frozen=True)
class EvalConfig:
    """The test protocol of the final evaluation (what the record reports)."""

    eval_mode: str = "whole"  # "whole" image or "slide" (sliding window)
    eval_window: int = 768
    eval_stride: int = 512
    eval_scales: tuple[float, ...] = (1.0,)  # several scales: probabilities averaged over them
    eval_flip: bool = False  # also average the horizontally flipped prediction
    eval_batch_size: int = 1

    def __post_init__(self) -> None:
        _require(self.eval_mode in EVAL_MODES, f"eval_mode must be one of {list(EVAL_MODES)}, got {self.eval_mode!r}")
        _require(0 < self.eval_stride <= self.eval_window,
                 f"need 0 < eval_stride <= eval_window, got {self.eval_stride!r} and {self.eval_window!r}")
        _require(all(scale > 0 for scale in self.eval_scales), f"eval_scales must be > 0, got {self.eval_scales!r}")
        _require(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}")


@dataclass(frozen=True)
class TrackingConfig:
    """Where records go and how runs are reported. Not part of a cell's identity."""

    runs_dir: str = "runs"
    run_name: str = ""  # default: encodes the cell, e.g. danet_r18-d8_pam_synthetic_s0
    wandb: str = "offline"
    wandb_project: str = "danet-ablations"
    wandb_entity: str = ""
    quiet: bool = False
    study: str = ""  # set by sweep drivers: the study or sweep that launched the run
    trial: int = -1

    def __post_init__(self) -> None:
        _require(self.wandb in WANDB_MODES, f"wandb must be one of {list(WANDB_MODES)}, got {self.wandb!r}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "tracking": TrackingConfig}
# Fields that do not change a run's result: left out of the cell hash.
NOT_IN_CELL = {"data": {"data_root", "workers"}, "train": {"device", "log_every", "checkpoint_every"},
               "eval": {"eval_batch_size"}, "tracking": None}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run: the single source of truth for every entry point."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; allowed: {list(SECTIONS)}")
        return cls(**{name: section_from_dict(section, data.get(name) or {})
                      for name, section in SECTIONS.items()})

    def cell_dict(self) -> dict[str, Any]:
        """The resolved settings that determine the result: no paths, device or tracking."""
        cell = {}
        for name, values in self.to_dict().items():
            skip = NOT_IN_CELL.get(name, set())
            if skip is not None:
                cell[name] = {key: value for key, value in values.items() if key not in skip}
        return cell

    def cell_hash(self) -> str:
        text = json.dumps(self.cell_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cell_name(self) -> str:
        """mmseg-style name of the ablation cell, e.g. danet_r50-d8_pam-cam_camvid_s0."""
        model = self.model
        parts = [name for name, on in (("pam", model.pam), ("cam", model.cam)) if on] or ["fcn"]
        backbone = model.backbone.replace("resnet", "r") + f"-d{model.output_stride}"
        if model.multi_grid:
            backbone += "-mg"
        return f"danet_{backbone}_{'-'.join(parts)}_{self.data.dataset}_s{self.train.seed}"

    def run_id(self) -> str:
        """Directory name of the run: its name and the cell hash, so equal configs share it."""
        return f"{self.tracking.run_name or self.cell_name()}-{self.cell_hash()[:8]}"

    def replace(self, section: str, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, so that dumps to YAML / JSON / W&B stay plain."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


FIELD_HELP = {
    "backbone": "ResNet depth: resnet18, resnet34, resnet50, resnet101",
    "weights": "backbone weights: none, imagenet (torchvision, from the torch cache) or a state dict path",
    "output_stride": "input size / stage-4 feature size: 8, 16 or 32",
    "multi_grid": "stage-4 blocks at dilation rates (1, 2, 4) x the stage rate (the paper's 4, 8, 16)",
    "pam": "position attention module",
    "cam": "channel attention module",
    "pam_reduction": "PAM query/key width is C / this (8: released code, 1: the paper)",
    "pam_impl": "PAM kernel: fused (best for the device), explicit, chunked, sdpa, triton (CUDA)",
    "cam_energy": "CAM energy: code = softmax(rowmax(E) - E) as released, paper = softmax(E)",
    "aux": "auxiliary classifiers (and loss terms) on the PAM and CAM branches",
    "fcn_aux": "mmseg's auxiliary FCN head on stage 3",
    "loss_weight_pam": "weight of the PAM branch loss",
    "loss_weight_cam": "weight of the CAM branch loss",
    "loss_weight_aux": "weight of the FCN auxiliary loss",
    "num_classes": "number of classes; 0 takes the dataset's",
    "dropout": "Dropout2d probability before each classifier",
    "dataset": "synthetic (no files), camvid, cityscapes, voc",
    "data_root": "dataset folder (default: the DANET_DATA environment variable)",
    "train_split": "split used for training",
    "val_split": "split used for validation",
    "image_scale": "resize images and labels by this factor before anything else",
    "crop_size": "side of the random training crop (smaller images are padded)",
    "random_scale": "random rescaling in [scale-min, scale-max] before the crop (the paper's DA)",
    "scale_min": "smallest random scale",
    "scale_max": "largest random scale",
    "hflip": "random horizontal flip in training",
    "batch_size": "training images per step",
    "workers": "DataLoader worker processes (results do not depend on it)",
    "synthetic_size": "side of the synthetic images",
    "synthetic_train_images": "number of synthetic training images",
    "synthetic_val_images": "number of synthetic validation images",
    "iterations": "training iterations (optimizer steps)",
    "epochs": "if > 0: train this many epochs instead of --iterations",
    "lr": "base learning rate of the backbone (poly schedule)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "poly_power": "power of the poly schedule lr = base * (1 - it / max_it) ^ power",
    "head_lr_multiplier": "learning rate of the heads = lr x this",
    "amp": "mixed precision on CUDA (ignored on the CPU)",
    "amp_dtype": "mixed precision type: bfloat16 or float16 (with a gradient scaler)",
    "channels_last": "channels-last memory format",
    "sync_bn": "under torchrun, SyncBatchNorm over the global batch (CUDA only; --no-sync-bn on the CPU)",
    "seed": "seed of everything random (weights, data order, augmentation, dropout)",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "log_every": "iterations between training log records",
    "eval_every": "iterations between validations (0: only the final one)",
    "checkpoint_every": "iterations between checkpoints of the last state",
    "eval_mode": "final test protocol: whole image or slide (sliding window)",
    "eval_window": "sliding window side",
    "eval_stride": "sliding window stride",
    "eval_scales": "test scales, e.g. 0.5,0.75,1.0 (probabilities averaged)",
    "eval_flip": "average with the horizontally flipped prediction at test",
    "eval_batch_size": "validation images per batch",
    "runs_dir": "folder of run records",
    "run_name": "run name (default: encodes the cell, e.g. danet_r18-d8_pam_synthetic_s0)",
    "wandb": "W&B mode: online, offline (default; no network needed) or disabled",
    "wandb_project": "W&B project",
    "wandb_entity": "W&B entity (default: your default entity)",
    "quiet": "no progress bars or tables (for agents)",
    "study": "name of the sweep or study that launched this run",
    "trial": "trial number within --study",
}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UsageError(ValueError):
    """A command line or config that cannot be run as asked (exit status 2)."""


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {TRUE_WORDS + FALSE_WORDS}, got {text!r}")


def parse_float_list(text: str) -> list[float]:
    """'0.5,0.75', '0.5 0.75' or '[0.5, 0.75]' (the form W&B agents send)."""
    items = text.strip().strip("[]()").replace(",", " ").split()
    if not items:
        raise ValueError("expected a list of numbers")
    return [float(item) for item in items]


class BoolFlag(argparse.Action):
    """--pam, --no-pam, --pam=true|false|1|0 (W&B agents send --pam=True / --pam=False)."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            flag = True if value is None else parse_bool(value)
        except ValueError as error:
            raise argparse.ArgumentError(self, str(error)) from None
        setattr(namespace, self.dest, flag if not option_string.startswith("--no-") else not flag)


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_flags(name: str) -> list[str]:
    flags = [f"--{name.replace('_', '-')}"]
    return flags + [f"--{name}"] if "_" in name else flags  # W&B sends the YAML key as it is


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, dest 'section.field', absent from the namespace unless given."""
    for section_name, section in SECTIONS.items():
        group = parser.add_argument_group(f"{section_name} settings")
        hints = typing.get_type_hints(section)
        for field in dataclasses.fields(section):
            flags, kind = _field_flags(field.name), hints[field.name]
            default = field.default
            options = {"dest": f"{section_name}.{field.name}", "default": argparse.SUPPRESS,
                       "help": f"{FIELD_HELP[field.name]} (default: {default})"}
            if kind is bool:
                flags.append(f"--no-{field.name.replace('_', '-')}")
                group.add_argument(*flags, action=BoolFlag, nargs="?", metavar="BOOL", **options)
            elif typing.get_origin(kind) is tuple:
                group.add_argument(*flags, type=parse_float_list, metavar="LIST", **options)
            else:
                group.add_argument(*flags, type=kind, metavar=kind.__name__.upper(), **options)


def explicit_settings(namespace: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given on the command line, as {section: {field: value}}."""
    settings: dict[str, dict[str, Any]] = {}
    for key, value in vars(namespace).items():
        if "." in key:
            section, name = key.split(".", 1)
            settings.setdefault(section, {})[name] = value
    return settings


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read config {path}: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, dict[str, Any]], override: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in override.items():
        merged.setdefault(section, {}).update(values)
    return merged


def check_combinations(cfg: RunConfig, explicit: dict[str, dict[str, Any]]) -> None:
    """Flags that cannot take effect under the other settings are usage errors, not silent no-ops."""
    given = {name for values in explicit.values() for name in values}
    model = cfg.model
    rules = [
        ("loss_weight_pam", not (model.pam and model.aux), "needs --pam and --aux"),
        ("loss_weight_cam", not (model.cam and model.aux), "needs --cam and --aux"),
        ("loss_weight_aux", not model.fcn_aux, "needs --fcn-aux"),
        ("pam_reduction", not model.pam, "needs --pam"),
        ("pam_impl", not model.pam, "needs --pam"),
        ("cam_energy", not model.cam, "needs --cam"),
        ("scale_min", not cfg.data.random_scale, "needs --random-scale"),
        ("scale_max", not cfg.data.random_scale, "needs --random-scale"),
        ("eval_window", cfg.eval.eval_mode != "slide", "needs --eval-mode slide"),
        ("eval_stride", cfg.eval.eval_mode != "slide", "needs --eval-mode slide"),
        ("data_root", cfg.data.dataset == "synthetic", "has no effect on the synthetic dataset"),
        ("trial", not cfg.tracking.study, "needs --study"),
    ]
    for name, impossible, reason in rules:
        if name in given and impossible:
            raise UsageError(f"--{name.replace('_', '-')} {reason}")


def field_section(name: str) -> str:
    """The section that holds a config field (field names are unique across sections)."""
    for section_name, section in SECTIONS.items():
        if name in {field.name for field in dataclasses.fields(section)}:
            return section_name
    raise UsageError(f"unknown config field {name!r}")


def sectioned(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{field: value} (the form of grids and sweeps) as {section: {field: value}}."""
    settings: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        settings.setdefault(field_section(name), {})[name] = value
    return settings


def resolve_run_config(preset: str | None, explicit: dict[str, dict[str, Any]], preset_dir: Path,
                       environment: dict[str, str], cell: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the preset YAML (a name in preset_dir or a path), then a grid cell's
    settings ({field: value}), then the command line."""
    settings: dict[str, dict[str, Any]] = {}
    if preset:
        path = Path(preset) if Path(preset).suffix in (".yaml", ".yml") else preset_dir / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in preset_dir.glob("*.yaml"))
            raise UsageError(f"--config {preset}: no such preset or file (presets: {', '.join(names)})")
        settings = load_yaml(path)
    settings = merge(merge(settings, sectioned(cell or {})), explicit)
    data = settings.setdefault("data", {})
    if data.get("dataset", "synthetic") != "synthetic" and not data.get("data_root"):
        data["data_root"] = environment.get("DANET_DATA", "")
    try:
        cfg = RunConfig.from_dict(settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_combinations(cfg, explicit)
    return cfg


def resolve_for_dataset(cfg: RunConfig, num_classes: int, batches_per_epoch: int) -> RunConfig:
    """Fill in what the dataset decides: the class count and, with --epochs, the iterations."""
    if cfg.model.num_classes not in (0, num_classes):
        raise UsageError(f"--num-classes {cfg.model.num_classes} contradicts dataset {cfg.data.dataset}, "
                         f"which has {num_classes} classes")
    cfg = cfg.replace("model", num_classes=num_classes)
    if cfg.train.epochs:
        cfg = cfg.replace("train", iterations=cfg.train.epochs * batches_per_epoch, epochs=0)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
