"""tapper.analysis.signal: the measurements behind issue 17's diagnostics."""

import math

import torch

from tapper.analysis.signal import mean_pairwise_cosine, train_sample
from tapper.data.types import Example


def test_mean_pairwise_cosine_of_known_vectors():
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert math.isclose(mean_pairwise_cosine(same), 1.0, abs_tol=1e-6)
    orthogonal = torch.eye(3)
    assert math.isclose(mean_pairwise_cosine(orthogonal), 0.0, abs_tol=1e-6)
    # Two opposite and one orthogonal: pairs (-1, 0, 0) -> mean -1/3.
    mixed = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert math.isclose(mean_pairwise_cosine(mixed), -1 / 3, abs_tol=1e-6)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 3)))


def ex(user, i):
    return Example(id=f"{user}-{i}", user_id=user, input="x", target="y", history=[])


def test_train_sample_spreads_over_users_most_recent_first():
    examples = [ex("a", i) for i in range(5)] + [ex("b", i) for i in range(2)]
    got = [e.id for e in train_sample(examples, 5)]
    assert got == ["a-4", "b-1", "a-3", "b-0", "a-2"]
    assert len(train_sample(examples, 100)) == 7
