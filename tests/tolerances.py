"""One table of numerical tolerances, by dtype and by tier, used by every numerics test.

The dtype sets the unit (fp32: 1e-5; bf16: 2e-2, for paths that round on purpose: 4-bit, bf16
compute). The tier says how far apart two results of the same math may be:

- ``exact``: the same computation done two ways (ours vs peft, saved vs loaded, one request vs
  several): the same operations in the same order, up to a few ulps;
- ``reordered``: the same math summed in another order (merged vs unmerged weights, a chunked or
  tiled matmul, cached vs full attention, DDP vs one process): 10x the unit, measured to cover fp32
  reassociation through the tiny test models with room to spare, while a wrong term moves logits by
  1e-3 or more.

Anything wider passes ``scale`` and says why at the call site.
"""
import torch

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
TIERS = {"exact": 1.0, "reordered": 10.0}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, tier: str = "exact"):
    """assert_close with the project's tolerance for ``dtype`` (defaults to expected's dtype) and ``tier``.

    ``scale`` widens the tolerance further for a computation the tiers do not cover, and must be
    justified at the call site.
    """
    dt = dtype or expected.dtype
    factor = TIERS[tier] * scale
    torch.testing.assert_close(actual, expected, atol=ATOL[dt] * factor, rtol=RTOL[dt] * factor)
