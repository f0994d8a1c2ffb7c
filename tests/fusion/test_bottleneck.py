import pytest
import torch
import torch.nn.functional as F

from pipeline.fusion.bottleneck import Bottleneck, projection


def test_bottleneck_structure():
    block = Bottleneck(64, 128)
    assert block.shortcut is not None and Bottleneck(128, 128).shortcut is None
    assert [m.weight.shape for m in (block.conv1, block.conv2, block.conv3)] == [(32, 64, 1, 1), (32, 32, 3, 3), (128, 32, 1, 1)]
    assert all(m.bias is None for m in (block.conv1, block.conv2, block.conv3, block.shortcut))
    assert block.conv1.norm.num_groups == 32
    # MSRA fill: kaiming normal with fan_out = out_channels * k * k.
    torch.manual_seed(0)
    big = Bottleneck(256, 2048)
    assert float(big.conv3.weight.detach().std()) == pytest.approx((2 / 2048) ** 0.5, rel=0.05)


@pytest.mark.parametrize("in_channels", [64, 128])
def test_forward_is_three_conv_norms_and_the_shortcut_summed_then_relu(in_channels):
    torch.manual_seed(0)
    block = Bottleneck(in_channels, 128).eval()
    x = torch.randn(2, in_channels, 5, 5)

    def conv_norm(m, h):
        return m.norm(F.conv2d(h, m.weight, padding=m.padding))

    h = F.relu(conv_norm(block.conv1, x))
    h = F.relu(conv_norm(block.conv2, h))
    skip = x if block.shortcut is None else conv_norm(block.shortcut, x)
    with torch.no_grad():
        assert torch.allclose(block(x), F.relu(conv_norm(block.conv3, h) + skip), atol=1e-6)


def test_projection_keys_follow_detectron2_as_the_reference_saves_them():
    keys = set(projection(64, 128).state_dict())
    assert {"0.conv1.weight", "0.conv1.norm.weight", "0.conv1.norm.bias", "0.conv2.weight", "0.conv3.weight",
            "0.shortcut.weight", "0.shortcut.norm.weight"} <= keys
    assert not any(k.endswith(".bias") and ".norm." not in k for k in keys)
    assert not any(k.startswith("0.shortcut") for k in projection(128, 128).state_dict())
