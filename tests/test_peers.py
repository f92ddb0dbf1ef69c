"""The peer TDA libraries as methods (kronfluence_ekfac, trak_lib, dattri_*): sign contract on the GLM, exactness
against hand-computed references, kronfluence's scale against the dense influence. Each test skips when its library
is not installed (they come with the ``peers`` extra, pulled in by ``dev``)."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import OptionError
from benchmark.registry import METHODS
from methods.base import RemovalContext, example_loss_grads, measurement_grads
from methods.influence import Influence, InfluenceConfig, Solver
from tests.conftest import SIGN_PEARSON_MIN, GlmProblem, full_batch_glm_context, make_task, pearson, tiny_scale

HAND_EKFAC_RTOL = 1e-8  # kronfluence (float64 throughout) vs EK-FAC by hand
KF_SCALE_RATIO_MAX = 1.5  # |kronfluence| / |dense influence| within [1/1.5, 1.5]; a 1/N slip is a factor N = 48
KF_SPEARMAN_MIN = 0.75  # measured 0.81 / 0.82 (Pearson 0.97: many effects are ≈ 0 and their ranks are noise)
DATTRI_CG_RTOL = 1e-5  # dattri accumulates scores in float32
TRAK_EXACT_RTOL = 1e-2  # traker's features are float32 (cond(ΦᵀΦ) ≈ 4e3 here); dattri's float64 ones reach 1e-11
TRACIN_RTOL = 1e-5  # float32 accumulation
SPLIT_PROJ_FRACTION = 0.5  # TRAK on the 48-example GLM: d = N/4 = 12 is too noisy for one model, d = 24 is not

PEERS = {  # name: (module to import, config overrides for the 48-example GLM)
    "kronfluence_ekfac": ("kronfluence", {}),
    "trak_lib": ("trak", {"max_proj_fraction": SPLIT_PROJ_FRACTION}),
    "dattri_if_cg": ("dattri", {}),
    "dattri_if_datainf": ("dattri", {}),
    "dattri_tracin": ("dattri", {"final_only": True}),  # 600 one-step checkpoints cost 35 s; the final one is enough
    "dattri_trak": ("dattri", {"max_proj_fraction": SPLIT_PROJ_FRACTION}),
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double())


def rel_err(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pred - ref).abs().max() / ref.abs().max())


def make(name: str, **overrides: object):
    cls = METHODS.get(name)
    return cls(cls.config_cls(**overrides))


@pytest.fixture(scope="module")
def gd_glm(glm: GlmProblem) -> tuple[RemovalContext, torch.Tensor]:
    """The GLM trained by 600 full-batch GD steps, and its exact LOO effects [K, Q, M]."""
    ctx, _ = full_batch_glm_context(glm, 600)
    return ctx, glm.exact_loo()


@pytest.fixture(scope="module")
def kronfluence_glm(gd_glm: tuple[RemovalContext, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    pytest.importorskip("kronfluence")
    method = make("kronfluence_ekfac")
    return method.predict(gd_glm[0])[0], method.info


@pytest.mark.parametrize("name", sorted(PEERS))
def test_sign_contract_on_glm(gd_glm: tuple[RemovalContext, torch.Tensor], name: str) -> None:
    """Pearson(prediction, exact LOO) > 0.5 for loss and margin; flipping the sign must fail."""
    module, overrides = PEERS[name]
    pytest.importorskip(module)
    ctx, truth = gd_glm
    pred = make(name, **overrides).predict(ctx)[0]
    assert pred.shape == truth.shape
    for j in range(2):
        assert pearson(pred[..., j], truth[..., j]) > SIGN_PEARSON_MIN
        assert pearson(-pred[..., j], truth[..., j]) < -SIGN_PEARSON_MIN


def hand_ekfac(ctx: RemovalContext, damping: float) -> torch.Tensor:
    """∇ℓ_kᵀ (EK-FAC of the empirical Fisher + damping·I)⁻¹ ∇m_q, [K, Q, M], for a one-Linear-layer model
    (George et al. 2018): A = E[aaᵀ], S = E[eeᵀ] (a = [x, 1], e = ∂ℓ/∂logits), eigenbases Q_A, Q_S,
    Λ = E[(Q_Sᵀ g_n Q_A)²] for the per-example gradient matrices g_n = e_n aₙᵀ [C, D+1]."""
    task, theta, x, y = ctx.task, ctx.theta_full[0], ctx.data.x_train, ctx.data.y_train
    n_out = task.layer_sizes()[-1]

    def as_matrix(v: torch.Tensor) -> torch.Tensor:  # [..., P] (W row-major, then b) → [..., C, D+1]
        w, b = v[..., :-n_out].unflatten(-1, (n_out, -1)), v[..., -n_out:].unsqueeze(-1)
        return torch.cat([w, b], dim=-1)

    grads = as_matrix(example_loss_grads(task, theta, x, y))  # [N, C, D+1]
    a = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    e = grads[..., -1]  # the bias gradient is e
    q_a = torch.linalg.eigh(a.T @ a / len(y)).eigenvectors
    q_s = torch.linalg.eigh(e.T @ e / len(y)).eigenvectors
    lam = (q_s.T @ grads @ q_a).pow(2).mean(0)
    g_m = as_matrix(measurement_grads(task, theta, ctx.x_query, ctx.y_query))  # [Q, M, C, D+1]
    pre = q_s @ ((q_s.T @ g_m @ q_a) / (lam + damping)) @ q_a.T
    return torch.einsum("kij,qmij->kqm", grads[ctx.targets], pre)


@pytest.mark.parametrize("variant", ["exact", "summed_loss_reading", "misaligned"])
def test_kronfluence_equals_hand_computed_ekfac(gd_glm: tuple[RemovalContext, torch.Tensor],
                                                kronfluence_glm: tuple[torch.Tensor, dict], variant: str) -> None:
    """Δm = (1/N)·hand EK-FAC with damping wd + λ. Negative controls: the reading "kronfluence's curvature is the
    summed loss's" (damping N·(wd + λ), no 1/N) and misaligned targets."""
    ctx, _ = gd_glm
    pred, info = kronfluence_glm
    n, damping = ctx.n_train, info["kronfluence_damping_factor"]
    assert damping == pytest.approx(ctx.scale.train.weight_decay + info["damping_mean"])
    if variant == "summed_loss_reading":
        ref = hand_ekfac(ctx, n * damping)
    else:
        ref = hand_ekfac(ctx, damping) / n
    if variant == "misaligned":
        pred = pred.roll(1, dims=0)
    assert (rel_err(pred, ref) < HAND_EKFAC_RTOL) is (variant == "exact")


@pytest.fixture(scope="module")
def dense_influence_glm(gd_glm: tuple[RemovalContext, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    method = Influence(InfluenceConfig(solver=Solver.DENSE))  # exact damped GGN; for a GLM also the Hessian
    return method.predict(gd_glm[0])[0], method.info


@pytest.fixture(scope="module")
def kronfluence_sampled_glm(gd_glm: tuple[RemovalContext, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    pytest.importorskip("kronfluence")
    method = make("kronfluence_ekfac", fisher="sampled")
    return method.predict(gd_glm[0])[0], method.info


@pytest.mark.parametrize("slip", [False, True])
def test_kronfluence_scale_matches_dense_influence(gd_glm: tuple[RemovalContext, torch.Tensor],
                                                  kronfluence_sampled_glm: tuple[torch.Tensor, dict],
                                                  dense_influence_glm: tuple[torch.Tensor, dict], slip: bool) -> None:
    """Sampled Fisher (E = GGN) vs the exact damped GGN with the same λ rule: magnitude ratio ≈ 1 (EK-FAC is not
    exact for one 10-class layer: 1.34 (loss) and 1.36 (margin) measured), Spearman > 0.75. Negative control: the
    same prediction without its 1/N (a factor N = 48)."""
    ctx, _ = gd_glm
    (pred, info), (ref, dense_info) = kronfluence_sampled_glm, dense_influence_glm
    pred = pred * (ctx.n_train if slip else 1)
    assert info["damping_mean"] == pytest.approx(dense_info["damping_mean"], rel=0.1)  # Monte Carlo tr F̂
    for j in range(2):
        ratio = float(pred[..., j].norm() / ref[..., j].norm())
        assert (1 / KF_SCALE_RATIO_MAX < ratio < KF_SCALE_RATIO_MAX) is not slip
        assert spearman(pred[..., j], ref[..., j]) > KF_SPEARMAN_MIN


@pytest.fixture(scope="module")
def dattri_cg_glm(gd_glm: tuple[RemovalContext, torch.Tensor]) -> torch.Tensor:
    pytest.importorskip("dattri")
    return make("dattri_if_cg", max_iter=30).predict(gd_glm[0])[0]


@pytest.mark.parametrize("misalign_targets", [False, True])
def test_dattri_cg_converges_to_dense_influence(dattri_cg_glm: torch.Tensor,
                                               dense_influence_glm: tuple[torch.Tensor, dict],
                                               misalign_targets: bool) -> None:
    """For a GLM the Hessian is the GGN: 30 CG iterations reach the dense influence (same damping rule)."""
    pred, ref = dattri_cg_glm, dense_influence_glm[0]
    if misalign_targets:
        pred = pred.roll(1, dims=0)
    assert (rel_err(pred, ref) < DATTRI_CG_RTOL) is not misalign_targets


@pytest.fixture(scope="module")
def full_rank_glm() -> RemovalContext:
    """A 200-example GLM on 2×2-pooled inputs (P = 50): its margin gradients span (C − 1)(D + 1) = 45 dimensions,
    fewer than N, so TRAK with d = 45 and no ridge is projection-free."""
    scale = tiny_scale(n_train=200, hidden=(), pool=14, wd=0.05)
    task, data = make_task(scale)
    prob = GlmProblem(task, data, torch.zeros(task.n_params, dtype=torch.float64), None)  # type: ignore[arg-type]
    theta = prob.solve(torch.ones(data.n_train, dtype=torch.float64), prob.theta)
    return RemovalContext(task=task, data=data, scale=scale, theta_full=theta.unsqueeze(0), seeds=[0],
                          targets=torch.arange(0, 200, 9), queries=torch.arange(10))


@pytest.mark.parametrize("name", ["trak_lib", "dattri_trak"])
@pytest.mark.parametrize("drop_out_to_loss", [False, True])
def test_trak_equals_projection_free_trak(full_rank_glm: RemovalContext, name: str, drop_out_to_loss: bool) -> None:
    """Δm = −∇m_qᵀ (ΦᵀΦ)⁺ ∇f_k · (1 − p_k), Φ the unprojected margin gradients: a d×r Gaussian sketch of the
    r-dimensional span leaves it unchanged when d = r. Negative control: without TRAK's (1 − p_k)."""
    pytest.importorskip(PEERS[name][0])
    ctx = full_rank_glm
    task, theta = ctx.task, ctx.theta_full[0]
    rank = (task.layer_sizes()[-1] - 1) * (task.input_dim + 1)
    ridge = {"lambda_reg": 0.0} if name == "trak_lib" else {"regularization": 0.0}
    pred = make(name, proj_dim=rank, max_proj_fraction=1.0, **ridge).predict(ctx)[0].double()
    phi = measurement_grads(task, theta, ctx.data.x_train, ctx.data.y_train)[:, 1]  # ∇f_n [N, P]
    p_train = torch.softmax(task.logits(theta, ctx.data.x_train), -1).gather(1, ctx.data.y_train[:, None])[:, 0]
    out_to_loss = torch.ones_like(p_train) if drop_out_to_loss else 1 - p_train
    g_m = measurement_grads(task, theta, ctx.x_query, ctx.y_query)  # [Q, M, P]
    kernel_inv = torch.linalg.pinv(phi.T @ phi, hermitian=True, rtol=1e-10)
    ref = -torch.einsum("kp,pr,qmr->kqm", phi[ctx.targets], kernel_inv, g_m) * out_to_loss[ctx.targets, None, None]
    assert (rel_err(pred, ref) < TRAK_EXACT_RTOL) is not drop_out_to_loss


@pytest.mark.parametrize("start_of_epoch", [False, True])
def test_dattri_tracin_equals_checkpoint_sum(glm: GlmProblem, start_of_epoch: bool) -> None:
    """Δm = Σ_e η̄_e/(B(1 − β)) ∇m_q(θ_e)ᵀ∇ℓ_k(θ_e) over the epoch-end checkpoints e = 1…E. Negative control: the
    same sum over the epoch-start checkpoints e − 1."""
    pytest.importorskip("dattri")
    ctx, _ = full_batch_glm_context(glm, 3)
    pred = make("dattri_tracin").predict(ctx)[0]
    train, ckpts = ctx.scale.train, ctx.checkpoints[0]
    ref = torch.zeros_like(pred)
    for e in range(1, ckpts.shape[0]):
        theta = ckpts[e - 1 if start_of_epoch else e]
        g_k = example_loss_grads(ctx.task, theta, ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
        g_m = measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)
        ref += train.lr / (train.batch_size * (1 - train.momentum)) * torch.einsum("kp,qmp->kqm", g_k, g_m)
    assert (rel_err(pred, ref) < TRACIN_RTOL) is not start_of_epoch


def test_peer_options() -> None:
    """Every peer runs on at most 8 seeds by default (≥ 4); bad options name the option and the choices."""
    for name in PEERS:
        method = METHODS.get(name)()
        assert method.config.max_seeds == 8 and method.seeds_used(128) == 8 and method.seeds_used(4) == 4
    with pytest.raises(OptionError, match="fisher must be one of: true, sampled"):
        make("kronfluence_ekfac", fisher="empirical")
    with pytest.raises(OptionError, match="damping must be one of: matched, heuristic"):
        make("kronfluence_ekfac", damping="none")
    with pytest.raises(OptionError, match="max_proj_fraction"):
        make("trak_lib", max_proj_fraction=0.0)
    with pytest.raises(OptionError, match="mode must be one of: rev-rev, rev-fwd"):
        make("dattri_if_cg", mode="fwd")
    with pytest.raises(OptionError, match="max_seeds"):
        make("dattri_trak", max_seeds=0)
