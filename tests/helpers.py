"""Shared test helpers. The relative error bounds per dtype live here and only here."""
import torch

# Max |actual - expected| / max(|expected|_max, tiny), compared with a float64 oracle.
# fp32: a few ulps times sqrt(K) growth on the small shapes the tests use; fp16: 2^-10 ulp with
# fp32 accumulation on the same shapes; bf16: 2^-7 ulp (GPU only: bf16 tl.dot is wrong under the
# Triton interpreter).
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values in the result (unwritten elements?)"
    scale = e.abs().max().clamp_min(1e-30)
    return float((a - e).abs().max() / scale)


def assert_rel_close(actual, expected, dtype, what=""):
    err = rel_err(actual, expected)
    bound = RTOL[dtype]
    assert err <= bound, f"{what}: relative error {err:.3g} > bound {bound:.3g} for {dtype}"
