"""Helpers shared by the Python tests: bitwise comparison and sample inputs."""

import torch

X_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8] + X_DTYPES

_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def assert_bitwise_equal(actual, expected):
    """Same dtype and shape, NaN in the same places, and every other element
    with the same bits (so -0.0 differs from 0.0).

    NaN payloads and signs are not compared: PyTorch's own float16 -> float32
    conversion gives different NaN bits on different CPU paths (its AVX512 path
    turns every NaN into 0x7fffffff, the scalar path keeps sign and payload).
    """
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.detach().contiguous()
    e = expected.detach().contiguous()
    nan_mismatch = torch.zeros_like(a, dtype=torch.bool)
    if a.dtype in _BITS:
        a_nan, e_nan = torch.isnan(a), torch.isnan(e)
        nan_mismatch = a_nan != e_nan
        a = a.view(_BITS[a.dtype]).masked_fill(a_nan & e_nan, 0)
        e = e.view(_BITS[e.dtype]).masked_fill(a_nan & e_nan, 0)
    mismatch = (a != e) | nan_mismatch
    if mismatch.any():
        i = mismatch.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(mismatch.sum())} of {a.numel()} elements differ; first at {i}: "
            f"{actual[tuple(i)].item()} vs {expected[tuple(i)].item()}"
        )


def make_x(shape, dtype, special=True, device="cpu"):
    """Random values with NaN, +-Inf and signed zeros sprinkled in."""
    x = torch.randn(shape, dtype=torch.float64, device=device) * 4
    if special and x.numel() > 0:
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 5),), device=device)
        specials = torch.tensor(
            [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -1.5], dtype=torch.float64, device=device
        )
        flat[picks] = specials[torch.randint(0, len(specials), (len(picks),), device=device)]
    return x.to(dtype)


def make_mask(shape, dtype, device="cpu", special=False):
    """A 0/1 mask of the given dtype; with special=True floating masks also
    hold other values (0.5, -2, NaN, Inf) and uint8 masks hold 2 and 255."""
    keep = torch.rand(shape, device=device) > 0.5
    if dtype == torch.bool:
        return keep
    mask = keep.to(dtype)
    if special and mask.numel() > 0:
        flat = mask.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 4),), device=device)
        if dtype == torch.uint8:
            values = torch.tensor([2, 255], dtype=torch.uint8, device=device)
        else:
            values = torch.tensor([0.5, -2.0, float("nan"), float("inf")], device=device).to(dtype)
        flat[picks] = values[torch.randint(0, len(values), (len(picks),), device=device)]
    return mask
