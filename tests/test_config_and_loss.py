import dataclasses

import pytest
import torch
import torch.nn.functional as F

from danet.config import ModelConfig
from danet.losses import SegmentationLoss


def test_model_config_round_trips_through_a_plain_dict():
    cfg = ModelConfig(backbone="resnet101", output_stride=16, multi_grid=True, pam=False, pam_reduction=1,
                      cam_energy="paper", fcn_aux=True, loss_weight_aux=0.25, num_classes=11, dropout=0.0)
    data = cfg.to_dict()
    assert set(data) == {field.name for field in dataclasses.fields(ModelConfig)}
    assert all(isinstance(value, (bool, int, float, str)) for value in data.values())
    assert ModelConfig.from_dict(data) == cfg
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_model_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['pamm'\]"):
        ModelConfig.from_dict({"pamm": True})
    with pytest.raises(ValueError, match=r"ModelConfig.pam must be bool, got 'yes'"):
        ModelConfig.from_dict({"pam": "yes"})
    with pytest.raises(ValueError, match=r"ModelConfig.num_classes must be int, got True"):
        ModelConfig.from_dict({"num_classes": True})
    assert ModelConfig.from_dict({"dropout": 0}).dropout == 0.0  # an int is a fine float


@pytest.mark.parametrize("overrides, message", [
    ({"backbone": "vgg16"}, r"backbone must be one of \['resnet18', 'resnet34', 'resnet50', 'resnet101'\], got 'vgg16'"),
    ({"output_stride": 4}, r"output_stride must be one of \[8, 16, 32\], got 4"),
    ({"pam_impl": "flash"}, r"pam_impl must be one of \['fused', 'explicit', 'chunked', 'sdpa', 'triton'\]"),
    ({"cam_energy": "neg"}, r"cam_energy must be one of \['code', 'paper'\]"),
    ({"pam_reduction": 0}, r"pam_reduction must be >= 1"),
    ({"num_classes": -1}, r"num_classes must be >= 0 \(0: from the dataset\)"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"loss_weight_cam": -1.0}, r"loss_weight_cam must be >= 0"),
])
def test_model_config_validates_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


@pytest.mark.parametrize("overrides, expected", [
    ({}, {"out": 1.0, "pam": 1.0, "cam": 1.0}),
    ({"aux": False}, {"out": 1.0}),
    ({"pam": False, "fcn_aux": True}, {"out": 1.0, "cam": 1.0, "aux": 0.4}),
    ({"cam": False, "loss_weight_pam": 0.5}, {"out": 1.0, "pam": 0.5}),
])
def test_loss_weights_follow_the_outputs_that_exist(overrides, expected):
    assert ModelConfig(**overrides).loss_weights() == expected


def test_loss_terms_add_up_to_the_weighted_total_and_ignore_255():
    torch.manual_seed(0)
    outputs = {name: torch.randn(2, 4, 5, 6, requires_grad=True) for name in ("out", "pam", "cam", "aux")}
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0] = 255
    weights = {"out": 1.0, "pam": 0.7, "cam": 0.3, "aux": 0.4}
    result = SegmentationLoss(weights)(outputs, target)

    valid = target != 255
    for name, logits in outputs.items():
        log_probs = F.log_softmax(logits.detach(), dim=1)
        picked = log_probs.gather(1, target.clamp(max=3)[:, None])[:, 0]
        torch.testing.assert_close(result.terms[name], -picked[valid].mean())
    expected_total = sum(weights[name] * term for name, term in result.terms.items())
    torch.testing.assert_close(result.total, expected_total)
    assert result.total.requires_grad and not result.terms["out"].requires_grad


def test_loss_refuses_an_output_without_a_weight():
    outputs = {"out": torch.randn(1, 3, 2, 2), "pam": torch.randn(1, 3, 2, 2)}
    with pytest.raises(KeyError, match=r"no loss weight for model outputs \['pam'\]"):
        SegmentationLoss({"out": 1.0})(outputs, torch.zeros(1, 2, 2, dtype=torch.long))


def test_fields_added_later_stay_out_of_the_cell_hash_at_their_default():
    from danet.config import IN_CELL_UNLESS_DEFAULT, RunConfig, fields_by_cell_rule

    assert {"head", "aux_branches", "deterministic"} <= fields_by_cell_rule(IN_CELL_UNLESS_DEFAULT)
    base = RunConfig()
    assert "head" not in base.cell_dict()["model"] and "deterministic" not in base.cell_dict()["train"]
    explicit_defaults = RunConfig.from_dict({"model": {"head": "danet", "aux_branches": "attention"},
                                             "train": {"deterministic": False}})
    assert explicit_defaults.cell_hash() == base.cell_hash()
    changed = [base.replace("model", aux_branches="all"), base.replace("train", deterministic=True),
               base.replace("model", head="fcn", pam=False, cam=False)]
    hashes = {cfg.cell_hash() for cfg in changed} | {base.replace("model", pam=False, cam=False).cell_hash()}
    assert len(hashes) == 4 and base.cell_hash() not in hashes


def test_cell_names_tell_the_two_baselines_and_deep_supervision_apart():
    from danet.config import RunConfig

    base = RunConfig().replace("model", pam=False, cam=False)
    assert base.cell_name() == "danet_r50-d8_fcn_synthetic_s0"
    assert base.replace("model", head="fcn").cell_name() == "danet_r50-d8_fcn-head_synthetic_s0"
    assert base.replace("model", aux_branches="all").cell_name() == "danet_r50-d8_fcn-ds_synthetic_s0"
