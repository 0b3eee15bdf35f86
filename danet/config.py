"""Typed configuration: frozen dataclasses that round-trip to and from plain dicts.

Unknown keys and wrong types are errors (ValueError naming the key), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from danet.models.attention import CAM_ENERGIES, PAM_IMPLS
from danet.models.backbone import BACKBONES, OUTPUT_STRIDES

Section = TypeVar("Section")


def _check_type(owner: str, name: str, value: Any, expected: Any) -> Any:
    """Return `value` as the annotated type, or raise ValueError naming the field."""
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
    num_classes: int = 19
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
        _require(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes!r}")
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
