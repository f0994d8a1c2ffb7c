import pytest
import torch
import torch.nn.functional as F

from pipeline.heads.heads import LinearHead, UPerNetHead


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
