"""Merge algorithms: closed forms on hand-sized tensors, then invariants."""
import pytest
import torch

from deltatune.combine.algorithms import (
    dare_drop,
    elect_sign,
    get_merge_method,
    list_merge_methods,
    magnitude_mask,
    register,
)
from tolerances import assert_close

T1 = torch.tensor([[1.0, -2.0, 3.0], [0.5, -4.0, 1.0]])
T2 = torch.tensor([[-2.0, 1.0, 1.0], [1.0, 1.0, -1.0]])


def test_registry_lists_and_rejects():
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"} <= set(list_merge_methods())
    with pytest.raises(KeyError, match="registered methods"):
        get_merge_method("tiess")
    with pytest.raises(ValueError, match="already registered"):
        register("ties")(lambda *a, **k: None)


def test_linear_closed_form():
    out = get_merge_method("linear")([T1, T2], [0.5, -2.0])
    assert_close(out, torch.tensor([[4.5, -3.0, -0.5], [-1.75, -4.0, 2.5]]))


def test_linear_refuses_density():
    with pytest.raises(ValueError, match="does not prune"):
        get_merge_method("linear")([T1], [1.0], density=0.5)


def test_magnitude_mask_closed_form_and_tie_break():
    # T2's magnitudes: 2, then five 1s; k = int(0.5 * 6) = 3 keeps the 2 and the two earliest 1s.
    assert magnitude_mask(T2, 0.5).tolist() == [[True, True, True], [False, False, False]]
    assert magnitude_mask(T1, 0.5).tolist() == [[False, True, True], [False, True, False]]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_magnitude_mask_keeps_floor_density_numel(density):
    t = torch.randint(-3, 4, (7, 11)).float()  # many exact ties
    mask = magnitude_mask(t, density)
    assert int(mask.sum()) == int(density * t.numel())
    if mask.any() and not mask.all():
        assert t.abs()[mask].min() >= t.abs()[~mask].max()


def test_magnitude_prune_closed_form():
    out = get_merge_method("magnitude_prune")([T1, T2], [1.0, 2.0], density=0.5)
    # trimmed T1 = [[0,-2,3],[0,-4,0]], trimmed T2 = [[-2,1,1],[0,0,0]]
    assert_close(out, torch.tensor([[-4.0, 0.0, 5.0], [0.0, -4.0, 0.0]]))


@pytest.mark.parametrize("name", ["magnitude_prune", "ties"])
def test_density_one_is_identity(name):
    t = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert_close(get_merge_method(name)([t], [1.0], density=1.0), t)


def test_ties_closed_form():
    # trimmed: T1' = [[0,-2,3],[0,-4,0]], T2' = [[-2,1,1],[0,0,0]]; totals [[-2,-1,4],[0,-4,0]]
    # elected [[-,-,+],[+,-,+]]; (0,2) is the mean of 1*3 and 3*1, the others have one agreeing entry.
    out = get_merge_method("ties")([T1, T2], [1.0, 3.0], density=0.5)
    assert_close(out, torch.tensor([[-6.0, -2.0, 3.0], [0.0, -4.0, 0.0]]))


def test_sign_election_total_vs_frequency():
    # One large negative against two small positives: mass says -, votes say +.
    stacked = torch.tensor([[-5.0], [1.0], [1.0]])
    assert elect_sign(stacked, "total").squeeze(1).tolist() == [True, False, False]
    assert elect_sign(stacked, "frequency").squeeze(1).tolist() == [False, True, True]
    ties = get_merge_method("ties")
    tensors = list(stacked)
    assert_close(ties(tensors, [1.0] * 3, density=1.0, majority_sign_method="total"), torch.tensor([-5.0]))
    assert_close(ties(tensors, [1.0] * 3, density=1.0, majority_sign_method="frequency"), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="majority_sign_method"):
        ties(tensors, [1.0] * 3, density=1.0, majority_sign_method="vote")


def test_zero_total_elects_positive():
    stacked = torch.tensor([[2.0], [-2.0]])
    assert elect_sign(stacked, "total").squeeze(1).tolist() == [True, False]


def test_dare_reproducible_with_seed_and_matches_global_rng():
    t = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    a = dare_drop(t, 0.3, torch.Generator().manual_seed(7))
    b = dare_drop(t, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.manual_seed(7)
    assert torch.equal(dare_drop(t, 0.3), a)  # same draws as the global RNG with the same seed
    kept = a != 0
    assert_close(a[kept], t[kept] / 0.3)  # survivors rescaled by 1 / (1 - p)


def test_dare_unbiased_in_expectation():
    # Bernoulli(0.3)/0.3 per entry has std sqrt(0.7/0.3) ~ 1.53; over 200k entries the mean's std
    # is ~0.0034, so 0.02 is ~6 sigma. Deterministic seed: no flakiness.
    ones = torch.ones(200_000)
    out = dare_drop(ones, 0.3, torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - 1.0) < 0.02
    assert abs((out != 0).float().mean().item() - 0.3) < 0.01


def test_dare_edges():
    t = torch.randn(4, 4)
    assert dare_drop(t, 1.0) is t
    assert torch.count_nonzero(dare_drop(t, 0.0)) == 0  # peft would give NaN (0 / 0)


def test_dare_ties_composes_dare_then_ties():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = get_merge_method("dare_ties")([T1, T2], [1.0, 2.0], density=0.5, generator=g1)
    dropped = [dare_drop(T1, 0.5, g2), dare_drop(T2, 0.5, g2)]
    expected = get_merge_method("ties")(dropped, [1.0, 2.0], density=1.0)
    assert_close(out, expected)


@pytest.mark.parametrize("density", [None, -0.1, 1.5])
def test_bad_density_is_explained(density):
    with pytest.raises(ValueError, match="density"):
        get_merge_method("ties")([T1, T2], [1.0, 1.0], density=density)


def test_shape_and_weight_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        get_merge_method("linear")([T1, T1[:, :2]], [1.0, 1.0])
    with pytest.raises(ValueError, match="one weight per tensor"):
        get_merge_method("linear")([T1, T2], [1.0])
