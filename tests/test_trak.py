"""TRAK: the projection is invisible when it is invertible, the sign contract, and the ensemble."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import Coupling
from benchmark.engine import build_schedule, initial_params, train_models
from methods.base import RemovalContext
from methods.trak import Trak, TrakConfig, TrakEnsemble
from tests.conftest import SIGN_PEARSON_MIN, GlmProblem, full_batch_glm_context, make_task, pearson, tiny_scale

PROJECTION_RTOL = 1e-8


@pytest.fixture(scope="module")
def small_glm_ctx() -> RemovalContext:
    """Softmax regression on 2×2-pooled digits: P = 50 ≤ N = 96, so ΦᵀRΦ is invertible."""
    scale = tiny_scale(n_train=96, hidden=(), pool=14, epochs=5, momentum=0.0, lr=0.5)
    task, data = make_task(scale)
    seeds = [0, 1]
    theta = train_models(task, data, scale.train,
                         [build_schedule(task.name, 96, scale.train, s, None, Coupling.MASKED) for s in seeds],
                         initial_params(task, seeds, torch.float64, "cpu")).theta
    return RemovalContext(task=task, data=data, scale=scale, theta_full=theta, seeds=seeds,
                          targets=torch.arange(0, 96, 7), queries=torch.arange(6))


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_full_dimension_projection_changes_nothing(small_glm_ctx: RemovalContext, projection: str) -> None:
    n_params = small_glm_ctx.theta_full.shape[1]
    exact = Trak(TrakConfig(projection="none", damping_scale=0.0)).predict(small_glm_ctx)
    full = Trak(TrakConfig(projection=projection, proj_dim=n_params, damping_scale=0.0)).predict(small_glm_ctx)
    assert float((full - exact).abs().max() / exact.abs().max()) < PROJECTION_RTOL
    low = Trak(TrakConfig(projection=projection, proj_dim=8, damping_scale=0.0)).predict(small_glm_ctx)
    assert float((low - exact).abs().max() / exact.abs().max()) > 1e-2  # a small dimension does change it


def test_trak_sign_contract_on_glm(glm: GlmProblem) -> None:
    ctx, _ = full_batch_glm_context(glm, 600)
    pred = Trak().predict(ctx)[0]
    truth = glm.exact_loo()
    for j in range(2):
        assert pearson(pred[..., j], truth[..., j]) > SIGN_PEARSON_MIN
        assert pearson(-pred[..., j], truth[..., j]) < -SIGN_PEARSON_MIN


def test_ensemble_is_the_mean_scores_times_the_mean_out_to_loss(small_glm_ctx: RemovalContext) -> None:
    method = Trak(TrakConfig(proj_dim=16))
    parts = [method.seed_scores(small_glm_ctx, s) for s in range(2)]
    ens = TrakEnsemble(TrakConfig(proj_dim=16)).predict(small_glm_ctx)
    assert ens.shape[0] == 2 and torch.equal(ens[0], ens[1]) and not TrakEnsemble.is_distributional
    scores = (parts[0][0] + parts[1][0]) / 2
    q_k = (parts[0][1] + parts[1][1]) / 2
    assert torch.allclose(ens[0, ..., 1], -scores * q_k.unsqueeze(1), rtol=1e-12)
    per_seed_mean = Trak(TrakConfig(proj_dim=16)).predict(small_glm_ctx).mean(0)
    assert not torch.allclose(ens[0], per_seed_mean, rtol=1e-6)  # the product of means ≠ mean of products


def test_trak_options() -> None:
    with pytest.raises(ValueError, match="projection must be one of: gaussian, rademacher, none"):
        TrakConfig(projection="sjlt")
    with pytest.raises(ValueError, match="proj_dim must be >= 1"):
        TrakConfig(proj_dim=0)


def test_ensemble_reuses_the_per_seed_scores_of_trak(small_glm_ctx: RemovalContext) -> None:
    """The in-process memo: trak_ensemble after trak computes no new seed scores and equals a fresh run;
    another θ is a different entry (the key is the content, not the seed index)."""
    from methods import trak as trak_module

    trak_module._SEED_SCORES.clear()
    Trak().predict(small_glm_ctx)
    n_entries = len(trak_module._SEED_SCORES)
    assert n_entries == small_glm_ctx.n_seeds
    reused = TrakEnsemble().predict(small_glm_ctx)
    assert len(trak_module._SEED_SCORES) == n_entries
    trak_module._SEED_SCORES.clear()
    assert torch.equal(reused, TrakEnsemble().predict(small_glm_ctx))
    moved = RemovalContext(**{**small_glm_ctx.__dict__, "theta_full": small_glm_ctx.theta_full * 1.01})
    Trak().predict(moved)
    assert len(trak_module._SEED_SCORES) == 2 * n_entries
