"""combine_lora_factors and plan_combination: closed forms, conventions and errors."""
import math
import warnings

import pytest
import torch

from deltatune.combine import COMBINATION_TYPES, LoraFactors, combine_lora_factors, pad_rank, plan_combination
from deltatune.combine.algorithms import get_merge_method
from deltatune.combine.svd import dense_svd_factors
from tolerances import assert_close


def _factors(r=3, out=6, inp=5, scaling=2.0, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), scaling, **kw)


def _truncated(delta, k):
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).float()


F1, F2 = _factors(seed=1, scaling=2.0), _factors(seed=2, scaling=0.5)
W = [0.7, -1.5]


def test_single_adapter_linear_is_exact_even_with_negative_weight():
    out = combine_lora_factors([F1], [-0.3], "linear")
    assert out.scaling == 1.0
    assert_close(out.B @ out.A, -0.3 * F1.delta_weight())


def test_linear_closed_form():
    # c = w * s = [1.4, -0.75]; A gets sign(c) sqrt|c|, B gets sqrt|c|.
    out = combine_lora_factors([F1, F2], W, "linear")
    assert_close(out.A, math.sqrt(1.4) * F1.A - math.sqrt(0.75) * F2.A)
    assert_close(out.B, math.sqrt(1.4) * F1.B + math.sqrt(0.75) * F2.B)


def test_cat_is_exact_and_stacks_ranks():
    F3 = _factors(r=2, seed=3, scaling=1.0)
    out = combine_lora_factors([F1, F3], W, "cat")
    assert out.r == 5
    assert_close(out.B @ out.A, 0.7 * F1.delta_weight() - 1.5 * F3.delta_weight())
    assert_close(out.A[:3], 1.4 * F1.A)  # the coefficient sits on A, B is copied
    assert_close(out.B[:, :3], F1.B)


@pytest.mark.parametrize("k", [2, 3, 6, 8])
def test_svd_is_truncated_svd_of_weighted_sum(k):
    F3 = _factors(r=2, seed=3)  # mixed ranks are fine for svd
    out = combine_lora_factors([F1, F3], W, "svd", svd_rank=k)
    assert out.r == k
    dW = 0.7 * F1.delta_weight() - 1.5 * F3.delta_weight()
    assert_close(out.B @ out.A, _truncated(dW, k), tier="reordered")  # fp32 sums of 5 rank-1 terms


def test_svd_rank_defaults_to_max_rank():
    assert combine_lora_factors([F1, _factors(r=2, seed=3)], W, "svd").r == 3


@pytest.mark.parametrize("ctype,method", [("ties_svd", "ties"), ("magnitude_prune_svd", "magnitude_prune")])
def test_pruning_svd_types_prune_the_dense_deltas(ctype, method):
    out = combine_lora_factors([F1, F2], W, ctype, density=0.4, svd_rank=2, majority_sign_method="frequency")
    kw = {"majority_sign_method": "frequency"} if method == "ties" else {}
    merged = get_merge_method(method)([F1.delta_weight(), F2.delta_weight()], W, density=0.4, **kw)
    assert_close(out.B @ out.A, _truncated(merged, 2), tier="reordered")


def test_fan_in_fan_out_sets_the_layout_dare_draws_in():
    f1, f2 = _factors(seed=1, fan_in_fan_out=True), _factors(seed=2, fan_in_fan_out=True)
    out = combine_lora_factors([f1, f2], W, "dare_linear_svd", density=0.5, generator=torch.Generator().manual_seed(4))
    # reference: draw the masks on the (in, out) weight layout, then transpose back
    g = torch.Generator().manual_seed(4)
    merged = get_merge_method("dare_linear")([f1.delta_weight().T, f2.delta_weight().T], W, density=0.5, generator=g)
    b, a = dense_svd_factors(merged.T, 3)
    assert_close(out.B @ out.A, b @ a, tier="reordered")


def test_dare_reproducible_with_generator():
    runs = [
        combine_lora_factors([F1, F2], W, "dare_ties", density=0.5, generator=torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].A, runs[1].A) and torch.equal(runs[0].B, runs[1].B)


def test_conv_factors_keep_their_kernel_shape():
    g = torch.Generator().manual_seed(0)
    convs = [LoraFactors(torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g), 1.0) for _ in range(2)]
    out = combine_lora_factors(convs, [1.0, 1.0], "svd", svd_rank=4)
    assert out.A.shape == (4, 3, 3, 3) and out.B.shape == (4, 4, 1, 1)
    assert_close(out.delta_weight(), convs[0].delta_weight() + convs[1].delta_weight(), tier="reordered")


def test_output_dtype_follows_first_adapter():
    half = [LoraFactors(f.A.bfloat16(), f.B.bfloat16(), f.scaling) for f in (F1, F2)]
    for ctype in ("linear", "cat", "svd"):
        out = combine_lora_factors(half, W, ctype)
        assert out.A.dtype == out.B.dtype == torch.bfloat16


def test_pad_rank():
    padded = pad_rank(F1, 5)
    assert padded.r == 5
    assert_close(padded.delta_weight(), F1.delta_weight())
    with pytest.raises(ValueError, match="r must be >= 3"):
        pad_rank(F1, 2)


def test_plan_combination():
    assert plan_combination("ties", [8, 8]) == plan_combination("ties", [8, 8], svd_rank=4)
    p = plan_combination("ties", [8, 8])
    assert (p.combination_type, p.r, p.lora_alpha) == ("ties", 8, 8.0)
    assert plan_combination("cat", [8, 4]).r == 12
    assert plan_combination("svd", [8, 4]).r == 8
    assert plan_combination("dare_ties_svd", [8, 4], svd_rank=5).r == 5
    assert plan_combination("svd", [8], svd_rank=2).combination_type == "linear"  # peft: one adapter
    assert plan_combination("svd", [16, 16], use_rslora=True).lora_alpha == 4.0  # scaling 4/sqrt(16) = 1
    with pytest.raises(ValueError, match="support mixed ranks"):
        plan_combination("linear", [8, 4])


@pytest.mark.parametrize("ctype", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_mixed_ranks_rejected_for_linear_family(ctype):
    with pytest.raises(ValueError, match=r"'cat', 'svd'.*support mixed ranks"):
        combine_lora_factors([F1, _factors(r=2)], W, ctype, density=0.5)


def test_errors_are_explained():
    with pytest.raises(ValueError, match="expected one of"):
        combine_lora_factors([F1, F2], W, "svd_ties")
    with pytest.raises(ValueError, match="DoRA"):
        combine_lora_factors([F1, _factors(use_dora=True)], W, "svd")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine_lora_factors([F1, F2], [1.0], "cat")
    with pytest.raises(ValueError, match="same module shape"):
        combine_lora_factors([F1, _factors(out=7)], W, "svd")
    with pytest.raises(ValueError, match="needs `density`"):
        combine_lora_factors([F1, F2], W, "ties")
    with pytest.raises(ValueError, match="do not chain"):
        LoraFactors(torch.zeros(3, 5), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        combine_lora_factors([F1, _factors(fan_in_fan_out=True)], W, "svd")


def test_unused_arguments_warn():
    with pytest.warns(UserWarning, match="density"):
        combine_lora_factors([F1, F2], W, "linear", density=0.5)
    with pytest.warns(UserWarning, match="svd_rank"):
        combine_lora_factors([F1, F2], W, "cat", svd_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combine_lora_factors([F1, F2], W, "ties_svd", density=0.5, svd_rank=2, svd_clamp=0.9)


def test_every_type_runs():
    for ctype in COMBINATION_TYPES:
        density = None if ctype in ("linear", "cat", "svd") else 0.5
        out = combine_lora_factors([F1, F2], W, ctype, density=density)
        assert out.B.shape[0] == 6 and out.A.shape[1] == 5 and torch.isfinite(out.delta_weight()).all()
