import urllib.error

import pytest
import torch
from torchvision import models as tv_models

from danet.models.backbone import BackboneWeightsError, DilatedResNet

DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101"]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_sizes_and_channels_for_every_depth_and_output_stride(depth, output_stride):
    backbone = DilatedResNet(depth, output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    expansion = 4 if depth in ("resnet50", "resnet101") else 1
    stage3_stride = min(output_stride, 16)
    assert features["stage3"].shape == (1, 256 * expansion, 64 // stage3_stride, 96 // stage3_stride)
    assert features["stage4"].shape == (1, 512 * expansion, 64 // output_stride, 96 // output_stride)
    assert backbone.channels == {"stage3": 256 * expansion, "stage4": 512 * expansion}


def _block_dilations(stage) -> list[int]:
    """The dilation of the 3x3 convolutions of each block (all of a block's must agree)."""
    rates = []
    for block in stage:
        block_rates = {conv.dilation[0] for conv in block.modules()
                       if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)}
        assert len(block_rates) == 1
        rates.append(block_rates.pop())
    return rates


@pytest.mark.parametrize("depth, output_stride, multi_grid, stage3, stage4", [
    ("resnet50", 8, False, [1, 2, 2, 2, 2, 2], [2, 4, 4]),
    ("resnet50", 8, True, [1, 2, 2, 2, 2, 2], [4, 8, 16]),  # the paper's multi-grid
    ("resnet50", 16, True, [1, 1, 1, 1, 1, 1], [2, 4, 8]),
    ("resnet50", 32, False, [1] * 6, [1, 1, 1]),
    ("resnet18", 8, True, [1, 2], [4, 8]),
    ("resnet34", 8, False, [1, 2, 2, 2, 2, 2], [2, 4, 4]),
])
def test_dilations_land_on_the_right_blocks(depth, output_stride, multi_grid, stage3, stage4):
    backbone = DilatedResNet(depth, output_stride, multi_grid)
    assert _block_dilations(backbone.layer3) == stage3
    assert _block_dilations(backbone.layer4) == stage4


def test_torchvision_bottleneck_dilation_is_reproduced_exactly():
    # torchvision supports dilation for ResNet-50: our rewrite must give the identical network
    torch.manual_seed(0)
    reference = tv_models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ours = DilatedResNet("resnet50", 8).eval()
    ours.load_weights(reference.state_dict())
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
        torch.testing.assert_close(ours(x)["stage4"], expected)


def test_bad_backbone_arguments_name_the_argument_and_allowed_values():
    with pytest.raises(ValueError, match=r"backbone must be one of \['resnet101', 'resnet18', 'resnet34', 'resnet50'\]"):
        DilatedResNet("resnet152")
    with pytest.raises(ValueError, match=r"output_stride must be one of \[8, 16, 32\], got 4"):
        DilatedResNet("resnet18", output_stride=4)


def test_local_state_dict_loads_and_reports_missing_and_unexpected_keys(tmp_path, caplog):
    torch.manual_seed(0)
    state = tv_models.resnet18().state_dict()
    del state["layer4.1.bn2.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with caplog.at_level("WARNING"):
        backbone = DilatedResNet("resnet18", weights=str(path))
    assert backbone.load_report == {"missing": ["layer4.1.bn2.running_mean"], "unexpected": ["extra.weight"]}
    assert "missing" in caplog.text and "unexpected" in caplog.text
    assert torch.equal(backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_unusable_weight_files_fail_with_the_file_name(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found: .*nope.pth"):
        DilatedResNet("resnet18", weights=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="cannot read backbone weights .*garbage.pth"):
        DilatedResNet("resnet18", weights=str(garbage))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(1)}, unrelated)
    with pytest.raises(BackboneWeightsError, match="no backbone weight matched"):
        DilatedResNet("resnet18", weights=str(unrelated))


def test_imagenet_weights_come_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = tv_models.resnet18().state_dict()
    url = tv_models.ResNet18_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / url.rsplit("/", 1)[-1])
    backbone = DilatedResNet("resnet18", weights="imagenet")
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])
    assert backbone.load_report == {"missing": [], "unexpected": []}


def test_imagenet_weights_without_cache_or_network_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    expected_path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(BackboneWeightsError) as error:
        DilatedResNet("resnet18", weights="imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert str(expected_path) in message and "--weights PATH" in message


def test_basic_blocks_take_the_previous_rate_in_both_convs_of_a_dilated_stages_first_block():
    # Pinned on purpose (docs/model.md): the released code's BasicBlock puts the stage's new
    # rate in the first block's conv2; here both 3x3 convs keep the previous rate. Changing it would
    # change the model behind every committed ResNet-18 record.
    backbone = DilatedResNet("resnet18", output_stride=8)
    first3, first4 = backbone.layer3[0], backbone.layer4[0]
    assert (first3.conv1.dilation, first3.conv2.dilation) == ((1, 1), (1, 1))
    assert (first4.conv1.dilation, first4.conv2.dilation) == ((2, 2), (2, 2))
    assert backbone.layer4[1].conv1.dilation == backbone.layer4[1].conv2.dilation == (4, 4)
