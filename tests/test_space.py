"""The search space: a centred space samples deviations from a start and reproduces every start exactly."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from autoprune.budget import layer_numels
from autoprune.model import build_model
from autoprune.priors import one_shot_allocation
from autoprune.space import BUDGET, SearchSpace


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("vgg", width=0.125)


def zero_counts(model, ratios):
    numels = layer_numels(model.channels)
    return {n: round(ratios.get(n, 0.0) * numels[n]) for n in numels}


@pytest.mark.parametrize("target", [0.25, 0.10, 0.05])
def test_centred_space_reproduces_every_start_exactly(model, target):
    starts = {r: one_shot_allocation(r, model, "fine_grained", target) for r in ("global", "lamp", "uniform")}
    upper = {n: max(s[n] for s in starts.values()) for n in starts["global"]}
    space = SearchSpace.build("fine_grained", model.channels, upper, max_size_fraction=target, budget_low=0.5,
                              centre=starts["global"], spread=0.1, starts=list(starts.values()))
    for name, start in starts.items():
        params = space.initial_params(start)
        assert params[BUDGET] == 1.0
        for n, d in params.items():  # every start lies inside the sampled ranges, unclipped
            if n != BUDGET:
                assert space.spread[n][0] <= d <= space.spread[n][1]
        proposal = space.suggest(optuna.trial.FixedTrial(params))
        ratios, _ = space.repair(proposal)
        assert zero_counts(model, ratios) == zero_counts(model, start), name
    # The centre's parameters are all 0; ranges start at +-spread and widen only to hold a start.
    assert set(space.initial_params(starts["global"]).values()) == {0.0, 1.0}
    uniform = space.deviations(starts["uniform"])
    for n, (lo, hi) in space.spread.items():
        assert lo == min(-0.1, uniform[n], space.deviations(starts["lamp"])[n])
        assert hi == max(0.1, uniform[n], space.deviations(starts["lamp"])[n])


def test_a_deviation_scales_the_kept_fraction(model):
    centre = one_shot_allocation("global", model, "fine_grained", 0.1)
    space = SearchSpace.build("fine_grained", model.channels, {n: 1.0 for n in centre}, max_size_fraction=0.1,
                              centre=centre)
    params = {n: 0.0 for n in space.upper}
    params["conv5"] = math.log(2)  # twice the centre's kept weights in conv5
    proposal = space.suggest(optuna.trial.FixedTrial(params))
    assert 1 - proposal["conv5"] == pytest.approx(2 * (1 - centre["conv5"]))
    assert {n: v for n, v in proposal.items() if n != "conv5"} == pytest.approx(
        {n: v for n, v in centre.items() if n != "conv5"})
    assert space.signature() != SearchSpace.build("fine_grained", model.channels, {n: 1.0 for n in centre},
                                                  max_size_fraction=0.1).signature()
