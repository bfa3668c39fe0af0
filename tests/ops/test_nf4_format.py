"""The NF4 format: quantization rule, double quantization, state dicts, and bit-compatibility
with bitsandbytes (where it is installed)."""

import json

import pytest
import torch

from kernelrl.ops import NF4Weight, nf4_dequantize, nf4_quantize
from kernelrl.ops.nf4 import format as fmt

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nearest_codes(w: torch.Tensor, blocksize: int):
    """Codes by brute force: the nearest NF4 value to w/absmax, ties to the lower code
    (float64 distances to the float32 codes, after bitsandbytes' float32 scaling)."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    code = torch.tensor(fmt.NF4_CODE, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) / 2                    # float32, as the format defines
    codes = (scaled[:, None] > mids[None, :]).sum(1)      # midpoints strictly below
    return codes, absmax


def _unpack(data: torch.Tensor, n: int) -> torch.Tensor:
    b = data.long()
    return torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", [((37, 129), 64), ((3, 1271), 32), ((64, 64), 64),
                                             ((5, 1000), 4096), ((1, 1), 64)])
def test_quantize_matches_brute_force(shape, blocksize, dtype):
    w = torch.randn(shape).to(dtype) * 3
    w.view(-1)[:blocksize] = 0                           # an all-zero block
    q = nf4_quantize(w, blocksize=blocksize, double_quant=False)
    codes, absmax = _nearest_codes(w, blocksize)
    assert torch.equal(q.absmax, absmax)
    assert torch.equal(_unpack(q.data, w.numel()), codes)
    assert torch.all(_unpack(q.data, blocksize)[:min(blocksize, w.numel())] == fmt.ZERO_CODE)
    if w.numel() % 2:
        assert q.data[-1].item() & 15 == fmt.ZERO_CODE   # the pad nibble
    deq = nf4_dequantize(q)
    assert deq.dtype == dtype and deq.shape == w.shape
    ref = (torch.tensor(fmt.NF4_CODE)[codes] * absmax.repeat_interleave(blocksize)[:w.numel()])
    assert torch.equal(deq, ref.to(dtype).view(shape))


def test_midpoint_ties_go_to_the_lower_code():
    code = torch.tensor(fmt.NF4_CODE, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, -mids]).reshape(1, -1)   # absmax 1: exact scaling
    w = torch.nn.functional.pad(w, (0, 64 - w.shape[1]))
    q = nf4_quantize(w, double_quant=False)
    got = _unpack(q.data, 64)
    assert got[1:16].tolist() == list(range(15))                       # mid j -> code j
    assert torch.equal(got[16:31], torch.bucketize(-mids, mids))


def test_nan_and_inf_blocks():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    q = nf4_quantize(w, double_quant=False)
    assert q.absmax[1].isnan() and q.absmax[2].isinf()
    assert torch.isfinite(q.absmax[[0, 3]]).all()
    deq = nf4_dequantize(q)
    assert torch.equal(deq[0], nf4_dequantize(nf4_quantize(w[:1], double_quant=False))[0])


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4_quantize(torch.randn(8, 64), blocksize=blocksize)


def test_bad_inputs():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        nf4_quantize(torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        nf4_quantize(torch.ones(0, 64))
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_dequantize(torch.ones(4))


def test_double_quant_decodes_within_its_resolution():
    w = torch.randn(300, 257)
    plain = nf4_quantize(w, double_quant=False)
    dq = nf4_quantize(w)
    assert dq.double_quant and dq.absmax.dtype == torch.uint8
    assert dq.nested_absmax.numel() == -(-plain.absmax.numel() // 256)
    assert torch.equal(dq.data, plain.data)
    scales = fmt.block_scales(dq)
    # the dynamic map's step near its top is 1/64 of the group's absmax: a bound on the error
    err = (scales - plain.absmax).abs().max().item()
    assert 0 < err <= (plain.absmax - dq.offset).abs().max().item() / 32
    assert abs(dq.offset - plain.absmax.mean().item()) < 1e-6


def test_dynamic_map_shape():
    d = fmt.dynamic_map()
    assert d.numel() == 256 and torch.equal(d, d.sort().values)
    assert d[0].item() == -d[-2].item() and d[-1].item() == 1.0 and (d == 0).sum() == 1


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip_through_safetensors(tmp_path, double_quant, dtype):
    safetensors = pytest.importorskip("safetensors.torch")
    q = nf4_quantize(torch.randn(33, 65).to(dtype), double_quant=double_quant)
    sd = q.to_state_dict("layer.weight")
    path = tmp_path / "w.safetensors"
    safetensors.save_file(sd, str(path))
    back = NF4Weight.from_state_dict(safetensors.load_file(str(path)), "layer.weight")
    assert back.shape == q.shape and back.dtype == dtype and back.blocksize == q.blocksize
    assert torch.equal(nf4_dequantize(back), nf4_dequantize(q))
    meta = json.loads(bytes(sd["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [33, 65]


def test_state_dict_errors():
    sd = nf4_quantize(torch.randn(8, 64)).to_state_dict()
    for key in ("weight.absmax", "weight.quant_map", "weight",
                "weight.quant_state.bitsandbytes__nf4", "weight.nested_quant_map"):
        broken = dict(sd)
        del broken[key]
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            NF4Weight.from_state_dict(broken)
    with pytest.raises(ValueError, match="unknown key 'weight.bogus'"):
        NF4Weight.from_state_dict({**sd, "weight.bogus": torch.zeros(1)})
    fp4 = {k.replace("nf4", "fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="not FP4"):
        NF4Weight.from_state_dict(fp4)
    other = {**sd, "bias": torch.zeros(8)}          # keys outside the prefix are ignored
    assert NF4Weight.from_state_dict(other).shape == (8, 64)


# ------------------------------------------------------------------ bitsandbytes
@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(257, 129), (128, 256), (3, 1271)])
def test_bytes_equal_bitsandbytes(bnb, shape, dtype):
    F = bnb.functional
    w = torch.randn(shape).to(dtype)
    w[0, :64] = 0
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = nf4_quantize(w, double_quant=False)
    assert torch.equal(q.data, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(nf4_dequantize(q), F.dequantize_4bit(packed, state))
    assert torch.equal(q.code, state.code) and torch.equal(fmt.dynamic_map(),
                                                           F.create_dynamic_map())


def test_double_quant_matches_bitsandbytes(bnb):
    """Nested absmax and offset are equal; bitsandbytes' CPU kernel rounds the 8-bit codes
    through a lookup table and picks a farther code for a few values, never a nearer one;
    each library dequantizes the other's state to the same values."""
    F = bnb.functional
    w = torch.randn(1000, 1000)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = nf4_quantize(w)
    assert torch.equal(q.data, packed.view(-1))
    assert torch.equal(q.nested_absmax, state.state2.absmax) and q.offset == state.offset.item()
    assert (q.absmax != state.absmax).float().mean() < 0.01
    plain = nf4_quantize(w, double_quant=False).absmax - q.offset
    nested = q.nested_absmax.repeat_interleave(256)[:plain.numel()]
    ours = (fmt.dynamic_map()[q.absmax.long()] * nested - plain).abs()
    theirs = (fmt.dynamic_map()[state.absmax.long()] * nested - plain).abs()
    assert torch.all(ours <= theirs)
    theirs = NF4Weight.from_state_dict(_bnb_state_dict(bnb, w))
    state.absmax = q.absmax                           # bitsandbytes decoding our codes
    assert torch.equal(F.dequantize_4bit(packed, state), nf4_dequantize(q))
    assert torch.equal(nf4_dequantize(theirs), F.dequantize_4bit(
        packed, F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)[1]))


def _bnb_state_dict(bnb, w):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else \
        layer.weight.to("cpu")
    return {k: v for k, v in layer.state_dict().items()}


def test_state_dict_loads_in_bitsandbytes(bnb, tmp_path):
    """(bitsandbytes 0.50's CPU dequantize kernel assumes blocks never straddle rows: with
    in_features 96 and blocks of 64 it decodes even its own weights wrongly, so the width
    here is a multiple of the block size.)"""
    safetensors = pytest.importorskip("safetensors.torch")
    w = torch.randn(64, 128)
    q = nf4_quantize(w)
    path = tmp_path / "kernelrl.safetensors"
    safetensors.save_file(q.to_state_dict("weight"), str(path))
    sd = safetensors.load_file(str(path))
    stats = {k: v for k, v in sd.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    x = torch.randn(3, 128)
    torch.testing.assert_close(bnb.matmul_4bit(x, param.t(), quant_state=param.quant_state),
                               x @ nf4_dequantize(q).t())      # only the matmul order differs
    got = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(got, nf4_dequantize(q))
    assert torch.equal(nf4_dequantize(NF4Weight.from_state_dict(_bnb_state_dict(bnb, w))),
                       bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(
                           w, blocksize=64, quant_type="nf4", compress_statistics=True)))
