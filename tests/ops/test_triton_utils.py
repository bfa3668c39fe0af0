"""The shared @triton.jit helpers: bf16 rounding that keeps every NaN, and the float64 exp."""

import pytest
import torch
import triton
import triton.language as tl

from backends import DEVICES
from kernelrl import backend
from kernelrl.ops._triton_utils import downcast, exp_fp64


@triton.jit
def _downcast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, downcast(tl.load(x_ptr + i), tl.bfloat16))


@triton.jit
def _exp_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, exp_fp64(tl.load(x_ptr + i)))


def _needs_triton(device):
    ok, why = backend.availability("triton", torch.device(device), torch.float32,
                                   backend.registered_ops()["token_logprobs"])
    if not ok:
        pytest.skip(f"triton unavailable on {device}: {why}")


@pytest.mark.parametrize("device", DEVICES)
def test_downcast_keeps_every_nan_and_rounds_to_nearest_even(device):
    _needs_triton(device)
    # 0x7FFFFFFF is a GPU's canonical NaN: adding the rounding bias once carried it into
    # the sign bit and stored -0.
    bits = torch.tensor([0x7FFFFFFF, 0x7FC00000, -1, 0x7FC00001,      # quiet NaNs (what math makes)
                         0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF],
                        dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).to(device)
    y = torch.empty(8, dtype=torch.bfloat16, device=device)
    _downcast_kernel[(1,)](x, y, N=8)
    assert y[:4].isnan().all(), y
    # ties go to even: 1 + 2^-8 -> 1, 1 + 3·2^-8 -> 1 + 2^-6; above a tie rounds up
    assert y[4:].float().tolist() == [1.0, 1.015625, 1.0078125, float("inf")]


@pytest.mark.parametrize("device", DEVICES)
def test_exp_fp64_is_within_one_ulp_of_float64(device):
    _needs_triton(device)
    x = torch.linspace(-87.0, 88.0, 4096, device=device)
    y = torch.empty_like(x)
    _exp_kernel[(1,)](x, y, N=4096)
    ref = x.double().exp()
    ulp = torch.finfo(torch.float32).eps * ref
    assert ((y.double() - ref).abs() <= ulp).all()
