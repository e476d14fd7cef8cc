"""Low-rank SVD of LoRA sums: exactness against the dense SVD, peft's split and clamp."""
import pytest
import torch

from deltatune.combine.svd import (
    dense_svd,
    dense_svd_factors,
    lowrank_svd,
    lowrank_svd_factors,
    quantile,
    quantile_clamp,
    split_factors,
)
from tolerances import assert_close


def _lora_sum(out=24, inp=40, ranks=(3, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B = torch.cat([torch.randn(out, r, generator=g, dtype=dtype) * c for r, c in zip(ranks, (0.7, -1.3, 2.0))], 1)
    A = torch.cat([torch.randn(r, inp, generator=g, dtype=dtype) for r in ranks], 0)
    return B, A


def _truncated(delta, k):
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (6, 40)])  # out < R is covered by (6, 40)
@pytest.mark.parametrize("k", [1, 4, 8])
def test_lowrank_factors_are_the_exact_truncated_svd(shape, k):
    B, A = _lora_sum(*shape)
    new_B, new_A = lowrank_svd_factors(B, A, k)
    assert new_B.shape == (shape[0], k) and new_A.shape == (k, shape[1])
    expected = _truncated(B @ A, k).float()
    # Products, not vectors: singular vectors are only defined up to sign.
    assert_close(new_B @ new_A, expected, tier="reordered")  # R-term fp32 sums, ~10 ulps of headroom


def test_full_rank_reproduces_delta():
    B, A = _lora_sum()
    new_B, new_A = lowrank_svd_factors(B, A, 8)
    assert_close(new_B @ new_A, B @ A, tier="reordered")


def test_rank_above_R_zero_pads():
    B, A = _lora_sum(ranks=(2, 1))
    new_B, new_A = lowrank_svd_factors(B, A, 6)
    assert new_B.shape == (24, 6) and new_A.shape == (6, 40)
    assert torch.count_nonzero(new_B[:, 3:]) == 0 and torch.count_nonzero(new_A[3:]) == 0
    assert_close(new_B @ new_A, B @ A, tier="reordered")


def test_lowrank_matches_dense_path_vectors_with_canonical_signs():
    B, A = _lora_sum(dtype=torch.float64)
    U, S, Vh = lowrank_svd(B, A)
    U_d, S_d, Vh_d = dense_svd(B @ A)
    m = S.numel()
    assert_close(S, S_d[:m])
    assert_close(Vh, Vh_d[:m])  # same sign convention on both paths (distinct singular values)
    assert_close(U, U_d[:, :m])


def test_split_puts_singular_values_in_B():
    B, A = _lora_sum()
    U, S, Vh = lowrank_svd(B, A)
    new_B, new_A = split_factors(U, S, Vh, 4)
    assert_close(new_A @ new_A.T, torch.eye(4), tier="reordered")  # A = Vh_k has orthonormal rows
    assert_close(new_B.norm(dim=0), S[:4], tier="reordered")  # B = U_k diag(S_k)


def test_quantile_matches_torch_and_large_path():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.3, 0.5, 0.99, 1.0):
        assert_close(quantile(x, q), torch.quantile(x, q))
    import deltatune.combine.svd as svd_mod

    old = svd_mod._QUANTILE_MAX
    svd_mod._QUANTILE_MAX = 10  # force the kthvalue path on a small input
    try:
        for q in (0.0, 0.3, 0.5, 0.99, 1.0):
            assert_close(quantile(x, q), torch.quantile(x, q))
    finally:
        svd_mod._QUANTILE_MAX = old


def test_quantile_clamp_closed_form():
    B = torch.tensor([[4.0, -1.0], [0.5, 2.0]])
    A = torch.tensor([[-3.0, 1.0], [0.0, 1.0]])
    # pooled signed entries sorted: -3 -1 0 .5 1 1 2 4; q=1 -> h=4 (no-op), q=0.75 -> h=1.25
    cb, ca = quantile_clamp(B, A, 1.0)
    assert_close(cb, B)
    assert_close(ca, A)
    cb, ca = quantile_clamp(B, A, 0.75)
    assert_close(cb, torch.tensor([[1.25, -1.0], [0.5, 1.25]]))
    assert_close(ca, torch.tensor([[-1.25, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="svd_clamp"):
        quantile_clamp(B, A, 1.5)


def test_dense_factors_match_lowrank_factors():
    B, A = _lora_sum()
    b1, a1 = lowrank_svd_factors(B, A, 5, clamp=0.9)
    b2, a2 = dense_svd_factors(B @ A, 5, clamp=0.9)
    assert_close(b1 @ a1, b2 @ a2, tier="reordered")


def test_half_precision_inputs_are_computed_in_fp32():
    B, A = _lora_sum()
    new_B, new_A = lowrank_svd_factors(B.bfloat16(), A.bfloat16(), 8)
    assert new_B.dtype == torch.float32
    assert_close(new_B @ new_A, B.bfloat16().float() @ A.bfloat16().float(), tier="reordered")


def test_shape_errors():
    with pytest.raises(ValueError, match=r"B \(out, R\) and A \(R, in\)"):
        lowrank_svd(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lowrank_svd_factors(torch.zeros(3, 2), torch.zeros(2, 4), 0)
