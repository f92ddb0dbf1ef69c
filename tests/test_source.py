"""SOURCE against exact unrolling: the segment algebra on quadratics, and end to end on the GLM."""

from __future__ import annotations

import pytest
import torch

from benchmark.registry import METHODS
from methods.source import DenseEigen, Segment, SegmentMap, Source, SourceConfig, segment_plan, source_displacement
from methods.unroll import Unroll
from tests.conftest import SIGN_PEARSON_MIN, GlmProblem, full_batch_glm_context, pearson

EXACT_RTOL = 1e-10


def quadratic(p: int = 12, seed: int = 0) -> tuple[torch.Tensor, DenseEigen]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, dtype=torch.float64, generator=gen)
    h = a @ a.T / p + 1e-3 * torch.eye(p, dtype=torch.float64)
    h[0] = 0.0  # a null direction: F_r must be finite there
    h[:, 0] = 0.0
    evals, evecs = torch.linalg.eigh(h)
    return h, DenseEigen(evals.clamp(min=0), evecs)


def unroll_gd(h: torch.Tensor, grads: torch.Tensor, eta: float, n: int) -> torch.Tensor:
    """Exact first-order removal displacement of full-batch GD on a quadratic with linear ℓ_k:
    r_{t+1} = (I − ηH) r_t + (η/N) g_t, grads [T, K, P]."""
    r = torch.zeros_like(grads[0])
    for g in grads:
        r = r - eta * r @ h + eta * g / n
    return r


def segments_for(op: DenseEigen, grads: torch.Tensor, eta: float, n_segments: int) -> list[Segment]:
    plan = segment_plan(grads.shape[0], n_segments, list(range(grads.shape[0])))
    return [Segment(op, eta, b - a, grads[a:b].mean(0)) for a, b, _ in plan]


def test_source_power_form_equals_unroll_on_a_quadratic() -> None:
    h, op = quadratic()
    eta, steps, n = 0.5 / float(op.eigvals.max()), 40, 10
    grads = torch.randn(1, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).expand(steps, 3, 12)
    exact = unroll_gd(h, grads, eta, n)
    for n_segments in (1, 3):
        pred = source_displacement(segments_for(op, grads, eta, n_segments), n, SegmentMap.POWER)
        assert float((pred - exact).abs().max() / exact.abs().max()) < EXACT_RTOL
    # the exp form differs by O(η²λ_max²T) (and is not exact: the test could fail)
    pred_exp = source_displacement(segments_for(op, grads, eta, 1), n, SegmentMap.EXP)
    err = float((pred_exp - exact).abs().max() / exact.abs().max())
    assert EXACT_RTOL < err <= (eta * float(op.eigvals.max())) ** 2 * steps
    small_eta = eta / 10
    err_small = float((source_displacement(segments_for(op, grads, small_eta, 1), n, SegmentMap.EXP)
                       - unroll_gd(h, grads, small_eta, n)).abs().max())
    assert err_small < err * float(unroll_gd(h, grads, eta, n).abs().max())


def test_more_segments_never_hurt_with_a_varying_gradient() -> None:
    h, op = quadratic(seed=2)
    eta, steps, n = 0.3 / float(op.eigvals.max()), 64, 10
    gen = torch.Generator().manual_seed(3)
    g0, g1 = torch.randn(2, 3, 12, dtype=torch.float64, generator=gen)
    t = torch.linspace(0, 1, steps, dtype=torch.float64).view(-1, 1, 1)
    grads = g0 + t * g1 + torch.sin(6 * t) * g1.flip(0)
    exact = unroll_gd(h, grads, eta, n)
    errors = [float((source_displacement(segments_for(op, grads, eta, n_seg), n, SegmentMap.POWER) - exact).norm())
              for n_seg in (1, 2, 4, 8)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.5 * errors[0]  # and it is not a constant (the test can fail)


def test_source_with_one_segment_per_step_equals_unroll_on_the_glm(glm: GlmProblem) -> None:
    """Full-batch GD, one checkpoint per step: segment t uses H(θ_t) and ∇ℓ_k(θ_t), so SOURCE's power form
    with the Hessian is the unrolled recursion itself (indexing, sign and the 1/N all checked)."""
    ctx, _ = full_batch_glm_context(glm, 12)
    ud = Unroll().predict(ctx)
    cfg = SourceConfig(n_segments=12, curvature="hessian", segment_map="power")
    pred = Source(cfg).predict(ctx)
    assert float((pred - ud).abs().max() / ud.abs().max()) < 1e-9
    shifted = Source(SourceConfig(n_segments=6, curvature="hessian", segment_map="power")).predict(ctx)
    assert float((shifted - ud).abs().max() / ud.abs().max()) > 1e-6  # coarser segments are not exact


def test_source_sign_contract_on_glm(glm: GlmProblem) -> None:
    ctx, _ = full_batch_glm_context(glm, 600)
    pred = METHODS.get("source")().predict(ctx)[0]
    truth = glm.exact_loo()
    for j in range(2):
        assert pearson(pred[..., j], truth[..., j]) > SIGN_PEARSON_MIN
        assert pearson(-pred[..., j], truth[..., j]) < -SIGN_PEARSON_MIN


def test_segment_plan_and_options() -> None:
    assert segment_plan(100, 3, [0, 20, 40, 60, 80, 100]) == [(0, 33, [0, 1]), (33, 67, [2, 3]), (67, 100, [4])]
    assert segment_plan(100, 8, [0, 50, 100])[1] == (12, 25, [0])  # no checkpoint inside: the nearest one
    with pytest.raises(ValueError, match="segment_map must be one of: exp, power"):
        SourceConfig(segment_map="taylor")
    with pytest.raises(ValueError, match="n_segments must be >= 1"):
        SourceConfig(n_segments=0)
