"""Methods against exact answers: finite differences, exact LOO retraining, the UD → IF limit."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import Coupling
from benchmark.engine import build_schedule, initial_params, train_models
from benchmark.registry import METHODS
from methods.base import RemovalContext
from methods.influence import Curvature, Influence, InfluenceConfig, Solver
from methods.unroll import Unroll, UnrollConfig
from tests.conftest import (
    DENSE_CG_RTOL,
    EXACT_INFLUENCE,
    GLM_PEARSON_MIN,
    SIGN_PEARSON_MIN,
    UD_IF_RTOL,
    UNROLL_FD_RTOL,
    GlmProblem,
    full_batch_glm_context,
    make_task,
    pearson,
    tiny_scale,
)


def train_with_target_weight(task, data, scale, seeds, targets, queries, weight_k: float) -> torch.Tensor:
    """m(θ_T) [S, K, Q, M] when target k's weight is ``weight_k`` in every batch (masked schedule)."""
    out = []
    for s in seeds:
        scheds = []
        for k in targets.tolist():
            sch = build_schedule(task.name, data.n_train, scale.train, s, None, Coupling.MASKED)
            w = sch.weight.clone()
            w[sch.idx == k] = weight_k
            scheds.append(type(sch)(idx=sch.idx, weight=w, denom=sch.denom))
        theta0 = initial_params(task, [s] * len(scheds), torch.float64, "cpu")
        theta = train_models(task, data, scale.train, scheds, theta0).theta
        out.append(task.measurements_batched(theta, data.x_test[queries], data.y_test[queries]))
    return torch.stack(out)


@pytest.mark.parametrize("wrong_slot", [False, True])
def test_unroll_reverse_mode_equals_forward_mode(wrong_slot: bool) -> None:
    """Q·M adjoints pulled back through the trajectory give the same Δm as K forward tangents (momentum, wd,
    a padded last batch); negative control: reading the adjoint at the wrong training index fails."""
    scale = tiny_scale(n_train=42, hidden=(6,), activation="tanh", lr=0.3, momentum=0.9, wd=1e-3, batch=8, epochs=2)
    task, data = make_task(scale)
    seeds, targets, queries = [0, 3], torch.tensor([0, 5, 17, 41]), torch.arange(3)
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=torch.zeros(2, task.n_params,
                         dtype=torch.float64), seeds=seeds, targets=targets, queries=queries)
    forward = Unroll(UnrollConfig(mode="forward")).predict(ctx)
    rev_ctx = ctx if not wrong_slot else RemovalContext(**{**ctx.__dict__, "targets": (targets + 1) % 42})
    reverse = Unroll(UnrollConfig(mode="reverse")).predict(rev_ctx)
    err = float((forward - reverse).abs().max() / forward.abs().max())
    assert (err < 1e-10) is not wrong_slot
    assert Unroll().mode_for(ctx) == "forward"  # K = 4 < Q·M = 6
    assert Unroll().mode_for(RemovalContext(**{**ctx.__dict__, "targets": torch.arange(42)})) == "reverse"


@pytest.mark.parametrize("misalign_targets", [False, True])
def test_unroll_matches_central_finite_differences(misalign_targets: bool) -> None:
    scale = tiny_scale(n_train=40, hidden=(6,), activation="tanh", lr=0.3, momentum=0.9, wd=1e-3, batch=8, epochs=2)
    task, data = make_task(scale)
    seeds, targets, queries = [0, 1], torch.tensor([0, 5, 17, 39]), torch.arange(4)
    full = train_with_target_weight(task, data, scale, seeds, targets[:1], queries, 1.0)
    theta_full = train_models(task, data, scale.train,
                              [build_schedule(task.name, 40, scale.train, s, None, Coupling.MASKED) for s in seeds],
                              initial_params(task, seeds, torch.float64, "cpu")).theta
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=theta_full, seeds=seeds,
                         targets=targets, queries=queries)
    pred = Unroll().predict(ctx)  # [S, K, Q, M]
    delta = 1e-4  # w_k = 1 ∓ δ  ⇒  dm/dε ≈ (m(1−δ) − m(1+δ)) / 2δ, ε = 1 − w_k
    fd = (train_with_target_weight(task, data, scale, seeds, targets, queries, 1 - delta)
          - train_with_target_weight(task, data, scale, seeds, targets, queries, 1 + delta)) / (2 * delta)
    assert full.shape[0] == 2
    if misalign_targets:
        pred = pred.roll(1, dims=1)
    err = (pred - fd).abs().max() / fd.abs().max()
    assert (err < UNROLL_FD_RTOL) is not misalign_targets


@pytest.mark.parametrize("misalign_targets", [False, True])
def test_influence_matches_exact_loo_on_glm(glm: GlmProblem, misalign_targets: bool) -> None:
    pred = Influence(EXACT_INFLUENCE).predict(glm.ctx)[0]  # [K, Q, M]
    truth = glm.exact_loo()
    if misalign_targets:
        pred = pred.roll(1, dims=0)
    for j in range(2):  # loss and margin
        assert (pearson(pred[..., j], truth[..., j]) > GLM_PEARSON_MIN) is not misalign_targets


@pytest.mark.parametrize("steps", [3, 1500])
def test_unroll_converges_to_influence_on_glm(glm: GlmProblem, steps: int) -> None:
    """d-TDA Remark 2: for a GLM under full-batch GD the UD response tends to the IF (no nullspace term)."""
    ctx, _ = full_batch_glm_context(glm, steps)
    ud = Unroll().predict(ctx)
    inf = Influence(EXACT_INFLUENCE).predict(ctx)
    err = float((ud - inf).abs().max() / inf.abs().max())
    assert (err < UD_IF_RTOL) is (steps > 100)  # negative control: 3 steps are far from the limit


@pytest.mark.parametrize("method", ["unroll", "influence", "influence_ekfac", "trak_ensemble"])
def test_sign_contract_on_glm(glm: GlmProblem, method: str) -> None:
    """Pearson(prediction, exact LOO) > 0.5 for loss and margin; flipping the sign must fail."""
    ctx, _ = full_batch_glm_context(glm, 600)
    pred = METHODS.get(method)().predict(ctx)[0]
    truth = glm.exact_loo()
    for j in range(2):
        assert pearson(pred[..., j], truth[..., j]) > SIGN_PEARSON_MIN
        assert pearson(-pred[..., j], truth[..., j]) < -SIGN_PEARSON_MIN


def test_dense_and_cg_agree() -> None:
    scale = tiny_scale(n_train=64, hidden=(8,), activation="tanh")
    task, data = make_task(scale)
    seeds = [0, 1]
    theta = train_models(task, data, scale.train,
                         [build_schedule(task.name, 64, scale.train, s, None, Coupling.MASKED) for s in seeds],
                         initial_params(task, seeds, torch.float64, "cpu")).theta
    for n_targets in (3, 12):  # 3 ≤ Q·M solves on targets; 12 > Q·M = 10 solves on queries
        ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=theta, seeds=seeds,
                             targets=torch.arange(n_targets), queries=torch.arange(5))
        dense = Influence(InfluenceConfig(solver=Solver.DENSE)).predict(ctx)
        for rank in (0, 32):  # plain CG and Nyström-preconditioned CG
            cg_method = Influence(InfluenceConfig(solver=Solver.CG, cg_rtol=1e-10, nystrom_rank=rank, exact_trace=True))
            cg = cg_method.predict(ctx)
            assert float((dense - cg).abs().max() / dense.abs().max()) < DENSE_CG_RTOL
    # negative control: a different damping changes the answer beyond the tolerance
    other = Influence(InfluenceConfig(solver=Solver.CG, damping_scale=1.0, exact_trace=True)).predict(ctx)
    assert float((dense - other).abs().max() / dense.abs().max()) > DENSE_CG_RTOL
    assert cg_method.info["damping_over_mean_eig"] == pytest.approx(0.1)
    # Hutchinson's trace from the sketch: λ within a few percent of the exact one
    sketched = Influence(InfluenceConfig(solver=Solver.CG, nystrom_rank=64))
    sketched.predict(ctx)
    assert sketched.info["damping_mean"] == pytest.approx(cg_method.info["damping_mean"], rel=0.25)


def test_pseudo_inverse_and_option_errors(glm: GlmProblem) -> None:
    pinv = Influence(InfluenceConfig(curvature=Curvature.HESSIAN, solver=Solver.DENSE, pseudo_inverse=True))
    exact = Influence(EXACT_INFLUENCE)
    assert torch.allclose(pinv.predict(glm.ctx), exact.predict(glm.ctx), rtol=1e-6, atol=1e-12)  # H is invertible
    with pytest.raises(ValueError, match="curvature must be one of: ggn, hessian"):
        InfluenceConfig(curvature="fisher")
    with pytest.raises(ValueError, match="use curvature 'ggn'"):
        Influence(InfluenceConfig(curvature="hessian", solver="cg")).predict(glm.ctx)
