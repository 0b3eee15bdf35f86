import itertools

import pytest
import torch

from danet.config import ModelConfig
from danet.losses import SegmentationLoss
from danet.models import DANet, build
from danet.models.attention import ChannelAttention, PositionAttention

NUM_CLASSES = 5  # deliberately not a dataset's class count
# every switch combination at output stride 8 on ResNet-18 in the everyday loop; strides 16 and 32 and
# ResNet-50 (bottleneck blocks) in the full suite
COMBINATIONS = [pytest.param(*values, marks=[pytest.mark.slow] if values[-1] == "resnet50" or values[3] != 8 else [])
                for values in itertools.product([True, False], [True, False], [True, False], [8, 16, 32],
                                                ["resnet18", "resnet50"])]


def _tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"backbone": "resnet18", "num_classes": NUM_CLASSES, **overrides})


@pytest.mark.parametrize("pam, cam, aux, output_stride, backbone", COMBINATIONS)
def test_every_switch_combination_trains_one_step(pam, cam, aux, output_stride, backbone):
    torch.manual_seed(0)
    cfg = _tiny_config(backbone=backbone, pam=pam, cam=cam, aux=aux, fcn_aux=aux, output_stride=output_stride)
    model = build(cfg)
    # gamma starts at 0, which blocks the gradient into query/key/value; open it for this check
    for module in model.modules():
        if isinstance(module, (PositionAttention, ChannelAttention)):
            torch.nn.init.constant_(module.gamma, 0.5)
    images = torch.randn(2, 3, 40, 56)
    target = torch.randint(0, NUM_CLASSES, (2, 40, 56))
    target[:, :3] = 255

    outputs = model(images)
    expected = {"out"} | ({"pam"} if pam and aux else set()) | ({"cam"} if cam and aux else set())
    expected |= {"aux"} if aux else set()
    assert set(outputs) == expected
    for logits in outputs.values():
        assert logits.shape == (2, NUM_CLASSES, 40, 56)

    loss = SegmentationLoss(cfg.loss_weights())(outputs, target)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_switched_off_parts_hold_no_parameters():
    full = build(_tiny_config())
    fcn = build(_tiny_config(pam=False, cam=False))
    assert fcn.head.pam_branch.attention is None and fcn.head.cam_branch.attention is None
    assert fcn.head.pam_classifier is None and fcn.head.cam_classifier is None
    assert fcn.aux_head is None
    names = {name for name, _ in full.named_parameters()} - {name for name, _ in fcn.named_parameters()}
    # the FCN baseline is the same stack minus attention modules and their branch classifiers
    assert names and all(name.startswith(("head.pam_branch.attention", "head.cam_branch.attention",
                                          "head.pam_classifier", "head.cam_classifier")) for name in names)


def test_dahead_sums_the_branches_into_the_fused_classifier():
    torch.manual_seed(0)
    model = build(_tiny_config(pam=True, cam=False)).eval()
    features = torch.randn(1, 512, 6, 7)
    head = model.head
    expected = head.classifier(head.pam_branch(features) + head.cam_branch(features))
    torch.testing.assert_close(head(features)["out"], expected)


def test_param_groups_split_backbone_and_heads_with_the_multiplier():
    model = build(_tiny_config(fcn_aux=True))
    groups = model.param_groups(lr=0.01, head_lr_multiplier=10.0)
    assert [group["name"] for group in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(0.01) and groups[1]["lr"] == pytest.approx(0.1)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert {id(p) for p in model.aux_head.parameters()} <= {id(p) for p in groups[1]["params"]}


def test_attention_maps_match_rows_of_the_full_attention():
    torch.manual_seed(0)
    model: DANet = build(_tiny_config(output_stride=8)).eval()
    images = torch.randn(1, 3, 64, 48)
    points = [(0, 0), (31, 20), (63, 47)]
    maps = model.attention_maps(images, points)
    assert maps["pam"].shape == (1, 3, 8, 6)
    assert maps["cam"].shape == (1, 128, 128)

    with torch.no_grad():
        pam_input = model.head.pam_branch.reduce(model.backbone(images)["stage4"])
        position = model.head.pam_branch.attention
        q = position.query(pam_input).flatten(2)[0].T
        k = position.key(pam_input).flatten(2)[0].T
        full = torch.softmax(q @ k.T, dim=-1)  # N x N
    flat_indices = [0, (31 * 8 // 64) * 6 + 20 * 6 // 48, 47]
    torch.testing.assert_close(maps["pam"][0].flatten(1), full[flat_indices])
    torch.testing.assert_close(maps["cam"].sum(-1), torch.ones(1, 128))
    with pytest.raises(ValueError, match="outside the 64x48 image"):
        model.attention_maps(images, [(64, 0)])


def test_attention_maps_skip_switched_off_modules():
    model = build(_tiny_config(pam=False)).eval()
    maps = model.attention_maps(torch.randn(1, 3, 32, 32), [(1, 1)])
    assert "pam" not in maps and "cam" in maps


def test_build_refuses_an_unresolved_class_count():
    with pytest.raises(ValueError, match="num_classes must be set"):
        build(ModelConfig(backbone="resnet18"))


def _parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_the_fcn_head_is_the_released_dilated_fcn_baseline():
    # ResNet-50 at 19 classes: conv3x3 2048->512 (no bias) + BN(512) + 1x1 classifier 512->19
    head = build(ModelConfig(backbone="resnet50", num_classes=19, head="fcn", pam=False, cam=False)).head
    assert _parameters(head) == 2048 * 512 * 9 + 2 * 512 + 512 * 19 + 19 == 9_447_955
    danet_head = build(ModelConfig(backbone="resnet50", num_classes=19, pam=False, cam=False)).head
    assert round(_parameters(danet_head) / 1e6, 1) == 23.6  # the other baseline: two conv branches
    with pytest.raises(ValueError, match="head fcn is the baseline without attention"):
        ModelConfig(head="fcn")


@pytest.mark.parametrize("pam, cam", [(False, False), (True, True)])
def test_deep_supervision_of_both_branches_whatever_the_modules(pam, cam):
    cfg = _tiny_config(pam=pam, cam=cam, aux=True, aux_branches="all")
    model = build(cfg)
    outputs = model(torch.randn(2, 3, 32, 32))
    assert set(outputs) == {"out", "pam", "cam"} == set(cfg.loss_weights())
    assert set(build(_tiny_config(pam=False, cam=False, aux=True)).train()(torch.randn(2, 3, 32, 32))) == {"out"}


def test_evaluation_computes_the_main_output_only():
    model = build(_tiny_config(aux=True, fcn_aux=True)).eval()
    with torch.no_grad():
        assert set(model(torch.randn(1, 3, 32, 32))) == {"out"}
    fcn = build(_tiny_config(head="fcn", pam=False, cam=False)).eval()
    with torch.no_grad():
        assert fcn(torch.randn(1, 3, 32, 32))["out"].shape == (1, NUM_CLASSES, 32, 32)
