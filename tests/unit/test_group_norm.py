"""The split-reduction GroupNorm lever computes what torch's GroupNorm computes."""

import pytest
import torch

from pipeline.group_norm import split_group_norm, use_split_group_norm


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 6), 4), ((1, 32, 3, 4, 4), 32), ((3, 6, 7), 2)])
def test_split_group_norm_equals_torch(shape, groups):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1.5
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    expected = torch.nn.functional.group_norm(x, groups, weight, bias, 1e-6)
    got = split_group_norm(x, groups, weight, bias, 1e-6)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_group_norm(x, groups, None, None, 1e-6),
                               torch.nn.functional.group_norm(x, groups, None, None, 1e-6), rtol=1e-5, atol=1e-5)


def test_half_precision_stays_close():
    torch.manual_seed(1)
    x = torch.randn(2, 64, 4, 16, 16)
    gn = torch.nn.GroupNorm(32, 64)
    expected = gn(x)
    got = split_group_norm(x.bfloat16(), 32, gn.weight.bfloat16(), gn.bias.bfloat16(), gn.eps).float()
    assert (got - expected).abs().max() < 0.05  # bfloat16 has ~3 significant digits


def test_patch_changes_every_group_norm_of_a_model_and_keeps_its_output():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                                torch.nn.Sequential(torch.nn.GroupNorm(2, 8, affine=False)))
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    assert use_split_group_norm(model) == 2
    assert use_split_group_norm(model) == 0  # once only
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_refuses_channels_that_do_not_split():
    with pytest.raises(ValueError, match="groups"):
        split_group_norm(torch.zeros(1, 6, 2), 4, None, None, 1e-5)
