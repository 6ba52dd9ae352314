"""Sparse merging and layer choice: pure functions, exact expectations."""

from __future__ import annotations

import pytest
import torch

from damoc.model.merge import dare, merge_layers, merge_matrix, merge_targets, topk_mask, trim
from damoc.model.prune import choose_contiguous, choose_discrete, n_to_remove

K = torch.ones(2, 2)
D1 = torch.tensor([[4.0, -1.0], [2.0, -3.0]])
D2 = torch.tensor([[-2.0, 5.0], [1.0, 1.0]])


@pytest.mark.parametrize("n,density", [(10, 0.2), (100, 0.33), (7, 0.5), (64 * 64, 0.05), (3, 0.01)])
def test_density_keeps_exactly_round_d_n(n, density):
    x = torch.randn(n)
    assert int(topk_mask(x, density).sum()) == max(1, round(density * n))
    assert int((trim(x, density) != 0).sum()) == max(1, round(density * n))
    assert int((dare(x, density, torch.Generator().manual_seed(0)) != 0).sum()) == max(1, round(density * n))


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(trim(D1, 0.5), torch.tensor([[4.0, 0.0], [0.0, -3.0]]))


def test_ties_matches_the_hand_computed_result():
    # trimmed: d1 -> [[4,0],[0,-3]], d2 -> [[-2,5],[0,0]]; elected sign of the sum [[2,5],[0,-3]]:
    # [[+,+],[0,-]]; agreeing means [[4,5],[0,-3]]; times 0.5 added to K.
    got = merge_matrix(K, [K + D1, K + D2], "ties", density=0.5, scale=0.5)
    assert torch.equal(got, torch.tensor([[3.0, 3.5], [1.0, -0.5]]))


def test_task_arithmetic_adds_the_mean_delta():
    got = merge_matrix(K, [K + D1, K + D2], "task_arithmetic", density=1.0, scale=1.0)
    assert torch.equal(got, K + (D1 + D2) / 2)


def test_sign_agree_adds_the_top_entries_that_agree_with_the_kept_sign():
    kept = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    removed = torch.tensor([[3.0, -4.0], [-5.0, 0.5]])  # (1,0) disagrees; top 2 agreeing: -4, 3
    got = merge_matrix(kept, [removed], "sign_agree", density=0.5, scale=1.0)
    assert torch.equal(got, torch.tensor([[4.0, -5.0], [1.0, 1.0]]))


def test_dare_rescale_keeps_the_expected_sum():
    delta = torch.arange(1.0, 21.0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([dare(delta, 0.25, gen) for _ in range(4000)])
    nz = draws != 0
    assert torch.equal(draws[nz], (delta.expand_as(draws) * 4)[nz])  # kept entries are delta * n/k
    assert abs(float(draws.sum(1).mean()) - float(delta.sum())) / float(delta.sum()) < 0.02


def test_merge_none_leaves_the_kept_layer_alone():
    assert merge_matrix(K, [K + D1], "none", 0.5, 1.0) is K


def test_merge_targets_nearest_kept_neighbour_preceding_on_a_tie():
    assert merge_targets([1, 2], 5) == {0: [1], 3: [2]}
    assert merge_targets([2], 5) == {1: [2]}
    assert merge_targets([3], 5) == {2: [3]}


def test_merge_layers_changes_only_matrices_of_kept_targets():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
                                  for _ in range(3)])
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    changed = merge_layers(layers, [1], "ties", 0.5, 1.0)
    assert set(changed) == {"0"} and changed["0"] > 0
    after = layers[0].state_dict()
    assert not torch.equal(after["0.weight"], before[0]["0.weight"])
    for key in ("0.bias", "1.weight", "1.bias"):  # biases and norms stay the kept layer's
        assert torch.equal(after[key], before[0][key])
    assert all(torch.equal(layers[2].state_dict()[k], v) for k, v in before[2].items())


def test_layer_choice():
    assert n_to_remove(8, 0.5, True) == 4 and n_to_remove(4, 0.9, True) == 2 and n_to_remove(4, 0.0, True) == 0
    scores = [0.1, 0.5, 0.2, 0.3, 0.05, 0.9]
    assert choose_discrete(scores, 2, protect_first_last=True) == [2, 4]
    assert choose_discrete(scores, 2, protect_first_last=False) == [0, 4]
    angular = [[0.5, 0.4, 0.1, 0.3, 0.6], [0.5, 0.2, 0.3, 0.6], [0.4, 0.1, 0.6]]  # n = 1, 2, 3 of 5 layers
    angular += [[0.5, 0.5], [0.5]]
    assert choose_contiguous(angular, 2, protect_first_last=True) == [1, 2]
    assert choose_contiguous(angular, 1, protect_first_last=True) == [2]
    assert choose_contiguous(angular, 2, protect_first_last=False) == [1, 2]
