"""One table of numerical tolerances, by dtype, used by every numerics test.

'exact' is for the same computation done two ways in the same dtype (merged vs unmerged,
ours vs peft). 'lossy' is for paths that round on purpose (4-bit, bf16 compute).
"""
import torch

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """assert_close with the project's tolerance for ``dtype`` (defaults to expected's dtype).

    ``scale`` widens the tolerance for deep computations (e.g. whole-model logits), and must be
    justified at the call site.
    """
    dt = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, atol=ATOL[dt] * scale, rtol=RTOL[dt] * scale)
