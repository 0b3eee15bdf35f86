"""Typed configuration: frozen dataclasses that round-trip to and from plain dicts.

Unknown keys and wrong types are errors (ValueError naming the key), never silently ignored.
Each field is documented once, in its `help` metadata, which the command line shows. This module
imports neither torch nor the models: `--help`, the reports and the launchers read it cheaply, and
the models import their choices from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

Section = TypeVar("Section")

# Choices of the model's switches (the models import them from here).
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
OUTPUT_STRIDES = (8, 16, 32)
HEADS = ("danet", "fcn")
AUX_BRANCHES = ("attention", "all")
PAM_IMPLS = ("fused", "explicit", "chunked", "sdpa", "triton")
CAM_ENERGIES = ("code", "paper")
DATASETS = ("synthetic", "camvid", "cityscapes", "voc")
SYNTHETIC_KEYS = ("frame", "marker")
WANDB_MODES = ("online", "offline", "disabled")
EVAL_MODES = ("whole", "slide")
DESIGNS = ("controlled", "as-released")
IGNORE_INDEX = 255  # the label value that no loss or metric counts

# How a field takes part in a cell's identity (its config hash):
IN_CELL = "always"  # every value is part of the identity
NOT_IN_CELL = "never"  # paths, devices, logging, tracking: the result does not depend on it
IN_CELL_UNLESS_DEFAULT = "unless-default"  # fields added after records were committed: at the default
# value they stay out of the hash, so adding them never orphans an existing record


def setting(default: Any, help: str, cell: str = IN_CELL, flag: bool = True) -> Any:
    """A config field with its one-line documentation, its part in the cell identity, and whether
    the command line has a flag for it (fields that a grid sets have none)."""
    return dataclasses.field(default=default, metadata={"help": help, "cell": cell, "flag": flag})


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


def _require_choice(name: str, value: Any, choices: tuple) -> None:
    _require(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Every switch of the model. Defaults are the released DANet code's (ResNet-50, OS 8)."""

    backbone: str = setting("resnet50", "ResNet depth: resnet18, resnet34, resnet50, resnet101")
    weights: str = setting("none", "backbone weights: none, imagenet (torchvision, from the torch cache) or a "
                                   "state dict path")
    output_stride: int = setting(8, "input size / stage-4 feature size: 8, 16 or 32")
    multi_grid: bool = setting(False, "stage-4 blocks at dilation rates (1, 2, 4) x the stage rate (the paper's "
                                      "4, 8, 16); needs output stride 8 or 16")
    head: str = setting("danet", "danet: the dual attention head (its modules switchable); fcn: the released "
                                 "dilated-FCN baseline head (conv3x3 C->C/4, BN, ReLU, dropout, 1x1), needs "
                                 "--no-pam --no-cam", IN_CELL_UNLESS_DEFAULT)
    pam: bool = setting(True, "position attention module")
    cam: bool = setting(True, "channel attention module")
    pam_reduction: int = setting(8, "PAM query/key width is C / this (8: released code, 1: the paper)")
    pam_impl: str = setting("fused", "PAM kernel: explicit, chunked, sdpa, triton (CUDA), or fused (the kernel "
                                     "measured best, one per kind of device)")
    cam_energy: str = setting("code", "CAM energy: code = softmax(rowmax(E) - E) as released, paper = softmax(E)")
    aux: bool = setting(True, "branch classifiers (and loss terms) on the DANet head's branches")
    aux_branches: str = setting("attention", "which branches get a classifier with --aux: attention (those whose "
                                             "module is on, as released) or all (both, whatever the modules: deep "
                                             "supervision as a switch of its own)", IN_CELL_UNLESS_DEFAULT)
    fcn_aux: bool = setting(False, "mmseg's auxiliary FCN head on stage 3")
    loss_weight_pam: float = setting(1.0, "weight of the PAM branch loss")
    loss_weight_cam: float = setting(1.0, "weight of the CAM branch loss")
    loss_weight_aux: float = setting(0.4, "weight of the FCN auxiliary loss")
    num_classes: int = setting(0, "number of classes; 0 takes the dataset's")
    dropout: float = setting(0.1, "Dropout2d probability before each classifier")

    def __post_init__(self) -> None:
        _require_choice("backbone", self.backbone, BACKBONES)
        _require_choice("output_stride", self.output_stride, OUTPUT_STRIDES)
        _require(not (self.multi_grid and self.output_stride == 32),
                 "multi_grid needs output_stride 8 or 16 (at 32 stage 4 keeps its stride and has no dilation to grid)")
        _require_choice("head", self.head, HEADS)
        _require(self.head == "danet" or not (self.pam or self.cam),
                 "head fcn is the baseline without attention: it needs --no-pam --no-cam")
        _require_choice("aux_branches", self.aux_branches, AUX_BRANCHES)
        _require(self.pam_reduction >= 1, f"pam_reduction must be >= 1, got {self.pam_reduction!r}")
        _require_choice("pam_impl", self.pam_impl, PAM_IMPLS)
        _require_choice("cam_energy", self.cam_energy, CAM_ENERGIES)
        _require(self.num_classes >= 0, f"num_classes must be >= 0 (0: from the dataset), got {self.num_classes!r}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("loss_weight_pam", "loss_weight_cam", "loss_weight_aux"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return section_from_dict(cls, data)

    def branch_classifiers(self) -> tuple[bool, bool]:
        """Whether the PAM and the CAM branch of the DANet head have their own classifier."""
        if self.head != "danet" or not self.aux:
            return False, False
        every_branch = self.aux_branches == "all"
        return self.pam or every_branch, self.cam or every_branch

    def loss_weights(self) -> dict[str, float]:
        """Weight of each output the model produces under this config, keyed like its outputs."""
        weights = {"out": 1.0}
        pam_branch, cam_branch = self.branch_classifiers()
        if pam_branch:
            weights["pam"] = self.loss_weight_pam
        if cam_branch:
            weights["cam"] = self.loss_weight_cam
        if self.fcn_aux:
            weights["aux"] = self.loss_weight_aux
        return weights


@dataclass(frozen=True)
class DataConfig:
    """Dataset, its location and the training augmentation (albumentations)."""

    dataset: str = setting("synthetic", "synthetic (no files), camvid, cityscapes, voc")
    data_root: str = setting("", "dataset folder (default: the DANET_DATA environment variable)", NOT_IN_CELL)
    train_split: str = setting("train", "split used for training")
    val_split: str = setting("val", "split used for validation")
    image_scale: float = setting(1.0, "resize images and labels by this factor before anything else")
    crop_size: int = setting(64, "side of the random training crop (smaller images are padded)")
    random_scale: bool = setting(False, "random rescaling in [scale-min, scale-max] before the crop (the paper's DA)")
    scale_min: float = setting(0.75, "smallest random scale")
    scale_max: float = setting(2.0, "largest random scale")
    hflip: bool = setting(True, "random horizontal flip in training")
    batch_size: int = setting(8, "training images per step (the global batch under torchrun)")
    workers: int = setting(2, "DataLoader worker processes (results do not depend on it)", NOT_IN_CELL)
    synthetic_size: int = setting(64, "side of the synthetic images")
    synthetic_train_images: int = setting(2048, "number of synthetic training images")
    synthetic_val_images: int = setting(64, "number of synthetic validation images")
    synthetic_key: str = setting("frame", "where the synthetic images show the key color: frame (a border) or "
                                 "marker (one small square far from the objects; the positive control)",
                                 IN_CELL_UNLESS_DEFAULT)

    def __post_init__(self) -> None:
        _require_choice("dataset", self.dataset, DATASETS)
        _require_choice("synthetic_key", self.synthetic_key, SYNTHETIC_KEYS)
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

    iterations: int = setting(1000, "training iterations (optimizer steps)")
    epochs: int = setting(0, "if > 0: train this many epochs instead of --iterations")
    lr: float = setting(0.01, "base learning rate of the backbone (poly schedule)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(1e-4, "SGD weight decay")
    poly_power: float = setting(0.9, "power of the poly schedule lr = base * (1 - it / max_it) ^ power")
    head_lr_multiplier: float = setting(10.0, "learning rate of the heads = lr x this")
    amp: bool = setting(True, "mixed precision on CUDA (ignored on the CPU)")
    amp_dtype: str = setting("bfloat16", "mixed precision type: bfloat16 or float16 (with a gradient scaler)")
    channels_last: bool = setting(False, "channels-last memory format")
    sync_bn: bool = setting(True, "under torchrun, SyncBatchNorm over the global batch (CUDA only; --no-sync-bn "
                                  "on the CPU)")
    deterministic: bool = setting(False, "deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS "
                                         "workspace config): repeatable on the same GPU, slower; cannot make two "
                                         "CPU or GPU models agree", IN_CELL_UNLESS_DEFAULT)
    seed: int = setting(0, "seed of everything random (weights, data order, augmentation, dropout)")
    seed_offset: int = setting(0, "added to the seed of every random draw: the same recipe and seed ids drawn again "
                                  "(an A/A comparison pairs seed s with seed s + offset)", IN_CELL_UNLESS_DEFAULT)
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda or cuda:N", NOT_IN_CELL)
    log_every: int = setting(10, "iterations between training log records", NOT_IN_CELL)
    eval_every: int = setting(200, "iterations between validations (0: only the final one)")
    checkpoint_every: int = setting(100, "iterations between checkpoints of the last state", NOT_IN_CELL)

    @property
    def drawn_seed(self) -> int:
        """The seed every random draw uses."""
        return self.seed + self.seed_offset

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, f"iterations must be >= 1, got {self.iterations!r}")
        _require(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs!r}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _require_choice("amp_dtype", self.amp_dtype, ("bfloat16", "float16"))
        for name in ("log_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)!r}")
        _require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")


PROTOCOL_FIELDS = ("eval_mode", "eval_window", "eval_stride", "eval_scales", "eval_flip")  # EvalConfig's test protocol


@dataclass(frozen=True)
class EvalConfig:
    """The test protocol of the final evaluation (what the record reports)."""

    eval_mode: str = setting("whole", "final test protocol: whole image or slide (sliding window)")
    eval_window: int = setting(768, "sliding window side")
    eval_stride: int = setting(512, "sliding window stride")
    eval_scales: tuple[float, ...] = setting((1.0,), "test scales, e.g. 0.5,0.75,1.0 (probabilities averaged)")
    eval_flip: bool = setting(False, "average with the horizontally flipped prediction at test")
    eval_batch_size: int = setting(1, "validation images per batch", NOT_IN_CELL)

    def __post_init__(self) -> None:
        _require_choice("eval_mode", self.eval_mode, EVAL_MODES)
        _require(0 < self.eval_stride <= self.eval_window,
                 f"need 0 < eval_stride <= eval_window, got {self.eval_stride!r} and {self.eval_window!r}")
        _require(all(scale > 0 for scale in self.eval_scales), f"eval_scales must be > 0, got {self.eval_scales!r}")
        _require(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}")

    def protocol_settings(self) -> dict[str, Any]:
        """The fields that make the test protocol (all but the batch size)."""
        return {name: getattr(self, name) for name in PROTOCOL_FIELDS}

    def protocol_name(self) -> str:
        """The protocol's name in records and reports, one per protocol: whole, slide-w768-s512,
        ms0.75-1-1.25-flip, slide-w768-s512-flip, ..."""
        parts = [f"slide-w{self.eval_window}-s{self.eval_stride}"] if self.eval_mode == "slide" else []
        if self.eval_scales != (1.0,):
            parts.append("ms" + "-".join(f"{scale:g}" for scale in self.eval_scales))
        if self.eval_flip:
            parts.append("flip")
        return "-".join(parts) or "whole"


@dataclass(frozen=True)
class TrackingConfig:
    """Where records go and how runs are reported. Not part of a cell's identity."""

    runs_dir: str = setting("runs", "folder of run records", NOT_IN_CELL)
    run_name: str = setting("", "run name (default: encodes the cell, e.g. danet_r18-d8_pam_synthetic_s0)",
                            NOT_IN_CELL)
    wandb: str = setting("offline", "W&B mode: online, offline (no network needed) or disabled", NOT_IN_CELL)
    wandb_project: str = setting("danet-ablations", "W&B project", NOT_IN_CELL)
    wandb_entity: str = setting("", "W&B entity (default: your default entity)", NOT_IN_CELL)
    quiet: bool = setting(False, "no progress bars or tables (for agents)", NOT_IN_CELL)
    study: str = setting("", "name of the sweep or study that launched this run", NOT_IN_CELL)
    trial: int = setting(-1, "trial number within --study", NOT_IN_CELL)
    grid: str = setting("", "the grid this run is a cell of (set by --grid and the sweep drivers)", NOT_IN_CELL,
                        flag=False)
    grid_cell: str = setting("", "the grid's named cell, without its axes (e.g. pam-cam)", NOT_IN_CELL, flag=False)
    design: str = setting("", "the grid's design: controlled or as-released", NOT_IN_CELL, flag=False)
    ignore_plan: bool = setting(False, "train a grid cell even when the grid's sequential plan has stopped it (its "
                                       "config.yaml then says so)", NOT_IN_CELL)

    def __post_init__(self) -> None:
        _require_choice("wandb", self.wandb, WANDB_MODES)
        _require(self.design in ("", *DESIGNS), f"design must be one of {list(DESIGNS)}, got {self.design!r}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "tracking": TrackingConfig}


def defaults_by_cell_rule(rule: str) -> dict[str, Any]:
    """The default of each field (of every section) whose part in the cell identity is `rule`."""
    return {field.name: field.default if field.default is not dataclasses.MISSING else field.default_factory()
            for section in SECTIONS.values() for field in dataclasses.fields(section) if field.metadata["cell"] == rule}


def fields_by_cell_rule(rule: str) -> frozenset[str]:
    """Names of the fields (of every section) whose part in the cell identity is `rule`."""
    return frozenset(defaults_by_cell_rule(rule))


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
        """The resolved settings that determine the result: no paths, device or tracking, and no
        field added later while it has its default value (see `setting`)."""
        cell = {}
        for name in SECTIONS:
            section = getattr(self, name)
            values = {}
            for field in dataclasses.fields(section):
                value, rule = getattr(section, field.name), field.metadata["cell"]
                if rule == IN_CELL or (rule == IN_CELL_UNLESS_DEFAULT and value != field.default):
                    values[field.name] = list(value) if isinstance(value, tuple) else value
            if values:
                cell[name] = values
        return cell

    def cell_hash(self) -> str:
        text = json.dumps(self.cell_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cell_name(self) -> str:
        """mmseg-style name of the ablation cell, e.g. danet_r50-d8_pam-cam_camvid_s0."""
        model = self.model
        if model.head == "fcn":
            parts = ["fcn-head"]
        else:
            parts = [name for name, on in (("pam", model.pam), ("cam", model.cam)) if on] or ["fcn"]
            if model.aux and model.aux_branches == "all":
                parts.append("ds")  # deep supervision of both branches
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


# The exit statuses of every command; 3: a run stopped on request (SIGTERM, SIGUSR1) at a checkpoint
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 3


class UsageError(ValueError):
    """A command line or config that cannot be run as asked (exit status 2)."""


def find_yaml(name_or_path: str, folder: Path, what: str) -> Path:
    """A YAML file given by path, or by name in `folder`; a usage error listing the names otherwise."""
    path = Path(name_or_path) if Path(name_or_path).suffix in (".yaml", ".yml") else folder / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise UsageError(f"{what} {name_or_path}: no such file or name (names: {names})")
    return path


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
    pam_branch, cam_branch = model.branch_classifiers()
    rules = [
        ("loss_weight_pam", not pam_branch, "needs a PAM branch classifier (--aux with --pam or --aux-branches all)"),
        ("loss_weight_cam", not cam_branch, "needs a CAM branch classifier (--aux with --cam or --aux-branches all)"),
        ("loss_weight_aux", not model.fcn_aux, "needs --fcn-aux"),
        ("aux_branches", not model.aux or model.head != "danet", "needs --aux and --head danet"),
        ("pam_reduction", not model.pam, "needs --pam"),
        ("pam_impl", not model.pam, "needs --pam"),
        ("cam_energy", not model.cam, "needs --cam"),
        ("scale_min", not cfg.data.random_scale, "needs --random-scale"),
        ("scale_max", not cfg.data.random_scale, "needs --random-scale"),
        ("eval_window", cfg.eval.eval_mode != "slide", "needs --eval-mode slide"),
        ("eval_stride", cfg.eval.eval_mode != "slide", "needs --eval-mode slide"),
        ("data_root", cfg.data.dataset == "synthetic", "has no effect on the synthetic dataset"),
        ("synthetic_key", cfg.data.dataset != "synthetic", "needs --dataset synthetic"),
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
    settings = load_yaml(find_yaml(preset, preset_dir, "--config")) if preset else {}
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


def batches_per_epoch(dataset_size: int, batch_size: int) -> int:
    return max(1, dataset_size // batch_size)


def resolve_for_dataset(cfg: RunConfig, num_classes: int, train_images: int, world_size: int = 1) -> RunConfig:
    """Fill in what the dataset decides (the class count and, with --epochs, the iterations) and
    check what it constrains: one batch must fit in the training set and divide among the ranks."""
    data = cfg.data
    if cfg.model.num_classes not in (0, num_classes):
        raise UsageError(f"--num-classes {cfg.model.num_classes} contradicts dataset {data.dataset}, "
                         f"which has {num_classes} classes")
    if data.batch_size > train_images:
        raise UsageError(f"--batch-size {data.batch_size} is larger than the training set ({train_images} images)")
    if data.batch_size % world_size:
        raise UsageError(f"--batch-size {data.batch_size} is the global batch: it must divide among {world_size} ranks")
    cfg = cfg.replace("model", num_classes=num_classes)
    if cfg.train.epochs:
        cfg = cfg.replace("train", iterations=cfg.train.epochs * batches_per_epoch(train_images, data.batch_size),
                          epochs=0)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
