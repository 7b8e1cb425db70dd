"""The small-map Conv2d (matmul weight gradient for bf16 on 4x4/2x2 maps) equals nn.Conv2d."""

import pytest
import torch
import torch.nn as nn

from akod_ray.models.layers import Conv2d


@pytest.mark.parametrize("size, stride", [(4, 1), (2, 1), (4, 2)])
def test_small_map_conv_matches_nn_conv2d_under_bf16_autocast(size, stride):
    torch.manual_seed(0)
    ref = nn.Conv2d(16, 24, 3, stride=stride, padding=1)
    ours = Conv2d(16, 24, 3, stride=stride, padding=1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 16, size, size).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for conv in (ref, ours):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xi)
        assert ours._small_map_path(x) and y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append(y.float())
        grads.append((xi.grad, conv.weight.grad, conv.bias.grad))
        conv.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # the forward pass is the same kernel
    for a, b in zip(grads[0], grads[1]):
        scale = a.abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 0.02 * scale  # bf16 rounding of two summation orders


def test_fp32_and_large_maps_take_the_plain_path():
    conv = Conv2d(8, 8, 3, padding=1)
    assert not conv._small_map_path(torch.randn(2, 8, 8, 8))
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    ref = nn.Conv2d(8, 8, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), ref(x))
