import pytest
import torch
import torch.nn.functional as F

from pipeline.config import RESCALES
from pipeline.heads.heads import LinearHead, UPerNetHead, rescale


def test_linear_head_sums_upsampled_scales_then_pools():
    torch.manual_seed(0)
    head = LinearHead(8, 3)
    scales = [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    summed = scales[0] + F.interpolate(scales[1], size=(4, 4), mode="bilinear", align_corners=False)
    linear = head.decoder_head[2]
    torch.testing.assert_close(head(scales), linear(summed.mean(dim=(2, 3))))


def test_upernet_gives_logits_at_the_label_size():
    torch.manual_seed(0)
    head = UPerNetHead(16, num_scales=3, num_classes=5, channels=8)
    assert len(head.psp_modules) == 3  # pool scales trimmed to the number of scales
    head.eval()
    out = head([torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)], output_shape=(20, 20))
    assert out.shape == (2, 5, 20, 20)
    with pytest.raises(ValueError, match="needs output_shape"):
        head([torch.randn(1, 16, 8, 8)] * 3)


def test_upernet_neck_resamples_each_scale_as_the_reference():
    torch.manual_seed(0)
    head = UPerNetHead(16, num_scales=4, num_classes=3, channels=8, rescales=[4, 2, 1, 0.5, 0.25])
    assert len(head.neck.ops) == 4  # factors trimmed to the number of scales, as the reference does
    up4, up2 = head.neck.ops[0], head.neck.ops[1]
    assert [type(m).__name__ for m in up4] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert all((m.kernel_size, m.stride) == ((2, 2), (2, 2)) for m in (up4[0], up4[3], up2[0]))
    # Parameter names follow the reference's neck, so its weights map one to one.
    names = {"neck.ops.0.0.weight", "neck.ops.0.1.running_mean", "neck.ops.0.3.bias", "neck.ops.1.0.weight"}
    assert names <= set(head.state_dict())
    head.eval()
    scales = [torch.randn(2, 16, s, s) for s in (8, 4, 2, 2)]
    with torch.no_grad():
        out = head.neck(scales)
        assert [o.shape[-1] for o in out] == [32, 8, 2, 1]
        assert torch.equal(out[0], up4[3](F.gelu(up4[1](up4[0](scales[0])))))
        assert torch.equal(out[2], scales[2]) and torch.equal(out[3], F.max_pool2d(scales[3], 2, 2))
        assert head(scales, output_shape=(20, 20)).shape == (2, 3, 20, 20)


def test_upernet_default_neck_has_no_parameters_and_bad_factors_are_refused():
    head = UPerNetHead(16, num_scales=3, num_classes=5, channels=8)
    assert not any(k.startswith("neck.") for k in head.state_dict())
    with pytest.raises(ValueError, match=r"rescales \[1, 1\] has 2 factors for 3 scales"):
        UPerNetHead(16, num_scales=3, num_classes=5, channels=8, rescales=[1, 1])
    with pytest.raises(ValueError, match="rescale factor 3 is not one of"):
        UPerNetHead(16, num_scales=1, num_classes=5, channels=8, rescales=[3])


@pytest.mark.parametrize("factor", RESCALES)
def test_every_factor_the_config_accepts_builds_and_scales_by_it(factor):
    # config.RESCALES is what a config may ask for; rescale() must build each one.
    op = rescale(factor, 4).eval()
    with torch.no_grad():
        out = op(torch.randn(1, 4, 8, 8))
    assert out.shape == (1, 4, int(8 * factor), int(8 * factor))
