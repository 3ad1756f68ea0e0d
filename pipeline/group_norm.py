"""GroupNorm with its statistics computed by a split reduction (the `group_norm="split"` lever).

Why: on an H200, a denoising step of the full-size UNet spends 25 % of its kernel time in the
statistics kernel of PyTorch's native GroupNorm (docs/benchmarks.md, the kernel profile). That
kernel gives each (sample, group) row one thread block; the UNet's GroupNorms have few rows (the
temporal layers normalise (batch x 32 groups) rows of up to C/32 x frames x H x W elements each:
64 rows of 655,360 elements at 512p x 16 with guidance), so most of the GPU's 132 multiprocessors
idle while a few blocks walk long rows. `torch.var_mean` is a generic reduction, which PyTorch
splits over several blocks per output when outputs are few; the normalisation and the affine are
then one fused multiply-add per element (`addcmul`) with per-channel scale and shift. Same
memory traffic as the native kernel (read for the statistics, read + write to normalise), more
parallelism. The result equals `torch.nn.functional.group_norm` up to summation order.

It is a lever, off by default, until the GPU bench measures it (`python -m bench.generation_gpu
--levers group_norm_split`); on the CPU the native kernel is already parallel over rows.
"""

from __future__ import annotations

from typing import Any


def split_group_norm(x, num_groups: int, weight, bias, eps: float):
    """`F.group_norm(x, num_groups, weight, bias, eps)` with split-reduction statistics."""
    import torch

    n, c = x.shape[0], x.shape[1]
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    # Reductions accumulate half/bfloat16 input in float32 (the statistics are rounded to x's dtype
    # once at the end; the bench's frame PSNR against the native kernel says what that costs).
    var, mean = torch.var_mean(x.reshape(n, num_groups, -1), dim=-1, correction=0)
    rstd = torch.rsqrt(var.float() + eps)  # (n, groups)
    per_group = c // num_groups
    scale = rstd.repeat_interleave(per_group, dim=1)  # (n, c)
    shift = -mean.float().repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    view = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))


def use_split_group_norm(*models: Any) -> int:
    """Make every `torch.nn.GroupNorm` in `models` compute with `split_group_norm`; return how many."""
    import torch

    count = 0
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm) and not getattr(module, "_i2v_split", False):
                module.forward = _forward_of(module)
                module._i2v_split = True
                count += 1
    return count


def _forward_of(module):
    def forward(x):
        return split_group_norm(x, module.num_groups, module.weight, module.bias, module.eps)

    return forward
