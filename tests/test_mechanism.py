"""The mechanism study: downweighted ground truth, data-GGN column space, UD → IF, the CSV it writes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.func import grad, jacrev, jvp, vmap

from benchmark.config import Coupling, OptionError
from benchmark.downweighting import Layout, seed_schedules
from benchmark.engine import Schedule, build_schedule, initial_params, train_models
from benchmark.mechanism import (
    DataGgn,
    MechanismConfig,
    colspace_analysis,
    run_mechanism,
    scale_with,
    soft_fraction,
    unroll_predictions,
)
from benchmark.report.mechanism_section import mechanism_claims, mechanism_report_lines
from benchmark.scores import rowwise_pearson
from benchmark.store import UnitStore
from methods.base import RemovalContext, measurement_grads
from methods.influence import Curvature, Influence, InfluenceConfig, Solver, dense_curvature
from methods.unroll import Unroll
from tasks.mnist_mlp import SCALES
from tests.conftest import ENGINE_ATOL, UNROLL_FD_RTOL, make_task, tiny_scale

FD_EPS = 1e-4  # central finite-difference step in ε
VERDICTS = {"reproduced", "not reproduced", "inconclusive at this scale"}
EXACT_RTOL = 1e-9  # float64 identities (Gram vs explicit Jacobians, Woodbury vs dense eigh)


def first_steps(sched: Schedule, n_steps: int) -> Schedule:
    return Schedule(idx=sched.idx[:n_steps], weight=sched.weight[:n_steps], denom=sched.denom[:n_steps],
                    order=sched.order)


# ------------------------------------------------------------------------------ (i) downweighted truth
@pytest.mark.parametrize("variant", ["correct", "wrong_sign", "one_over_b"])
@pytest.mark.parametrize("layout", [Layout.OWN, Layout.SHARED])
def test_downweighted_steps_are_sgd_on_the_weighted_objective(variant: str, layout: Layout) -> None:
    """Two engine steps on the downweighted schedule = manual SGD on (1/B)Σ_{i∈B}ℓ_i − ℓ_k/N + (wd/2)‖θ‖².
    Negative controls: the manual objective with +ℓ_k/N or −ℓ_k/B must not match."""
    scale = tiny_scale(n_train=40, hidden=(5,), momentum=0.0, lr=0.3, wd=1e-2, batch=8, epochs=1)
    task, data = make_task(scale)
    n, k_pos, targets = data.n_train, 2, torch.tensor([3, 11, 26])
    scheds = seed_schedules(task, n, scale, 0, targets, layout)
    sched = first_steps(scheds[1 + k_pos], 2)
    theta0 = initial_params(task, [0], torch.float64, "cpu")
    engine = train_models(task, data, replace(scale.train, epochs=1), [sched], theta0).theta[0]
    coef = {"correct": -1.0 / n, "wrong_sign": 1.0 / n, "one_over_b": -1.0 / scale.train.batch_size}[variant]
    base = build_schedule(task.name, n, scale.train, 0, None, Coupling.MASKED)
    theta, k = theta0[0].clone(), int(targets[k_pos])
    for t in range(2):
        xb, yb = data.x_train[base.idx[t]], data.y_train[base.idx[t]]

        def objective(th: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            loss_k = task.per_example_loss(th, data.x_train[k : k + 1], data.y_train[k : k + 1]).sum()
            return (
                task.per_example_loss(th, xb, yb).mean()
                + coef * loss_k
                + 0.5 * scale.train.weight_decay * th.pow(2).sum()
            )

        theta = theta - scale.train.lr * grad(objective)(theta)
    assert (float((engine - theta).abs().max()) < ENGINE_ATOL) is (variant == "correct")


def test_layouts_give_identical_runs() -> None:
    """``own`` (B+1 columns, ungrouped) and ``shared`` (B+K columns, grouped) train the same parameters."""
    scale = tiny_scale(n_train=40, hidden=(5,), momentum=0.9, lr=0.2, wd=1e-3, batch=8, epochs=2)
    task, data = make_task(scale)
    targets = torch.tensor([0, 7, 39])
    theta0 = initial_params(task, [1] * 4, torch.float64, "cpu")
    runs = [
        train_models(task, data, scale.train, seed_schedules(task, 40, scale, 1, targets, lay), theta0).theta
        for lay in Layout
    ]
    assert float((runs[0] - runs[1]).abs().max()) < ENGINE_ATOL
    assert float((runs[0][1:] - runs[0][:1]).abs().max()) > 1e-6  # downweighting moves the runs


@pytest.mark.parametrize("variant", ["correct", "wrong_sign", "one_over_b"])
def test_downweighted_finite_differences_match_every_batch_tangent(variant: str) -> None:
    """(θ_T(ε) − θ_T(−ε))/2ε of the ε-downweighted runs (loss_B − εℓ_k/N) = the forward-mode tangent
        r_{t+1} = r_t − η_t[(Ĥ_{B_t}(θ_t) + wd·I) r_t − (1/N)∇ℓ_k(θ_t)]     (source in EVERY step).
    Negative controls: source of the wrong sign, or (1/B) instead of (1/N), must not match."""
    scale = tiny_scale(n_train=32, hidden=(4,), momentum=0.0, lr=0.3, wd=1e-2, batch=8, epochs=2)
    task, data = make_task(scale)
    n, k, targets = data.n_train, 9, torch.tensor([9])
    theta0 = initial_params(task, [0, 0], torch.float64, "cpu")
    runs = [seed_schedules(task, n, scale, 0, targets, Layout.OWN, epsilon=e)[1] for e in (FD_EPS, -FD_EPS)]
    theta_pm = train_models(task, data, scale.train, runs, theta0).theta
    fd = (theta_pm[0] - theta_pm[1]) / (2 * FD_EPS)
    source = {"correct": 1.0 / n, "wrong_sign": -1.0 / n, "one_over_b": 1.0 / scale.train.batch_size}[variant]
    base = build_schedule(task.name, n, scale.train, 0, None, Coupling.MASKED)
    theta, r = theta0[0].clone(), torch.zeros_like(theta0[0])
    xk, yk = data.x_train[k : k + 1], data.y_train[k : k + 1]
    for t in range(base.idx.shape[0]):
        xb, yb = data.x_train[base.idx[t]], data.y_train[base.idx[t]]

        def batch_grad(th: torch.Tensor, xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            return grad(lambda p: task.per_example_loss(p, xb, yb).mean())(th) + scale.train.weight_decay * th

        g, hr = jvp(batch_grad, (theta,), (r,))
        g_k = grad(lambda p: task.per_example_loss(p, xk, yk).sum())(theta)
        r = r - scale.train.lr * (hr - source * g_k)
        theta = theta - scale.train.lr * g
    err = float((fd - r).norm() / r.norm())
    assert (err < UNROLL_FD_RTOL) is (variant == "correct")


# ------------------------------------------------------------------------------ (ii) column space
def test_soft_fraction_is_one_in_the_range_and_zero_in_the_null_space() -> None:
    """A [5, 12] of rank 5: g = Aᵀz has f ≈ 1, g ⊥ rows(A) has f ≈ 0; a wrong factor (of AAᵀ+μI with
    μ = λ_max) does not give 1."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    gram = a @ a.T
    lam_max = float(torch.linalg.eigvalsh(gram).max())
    factor = torch.linalg.cholesky(gram + 1e-12 * lam_max * torch.eye(5, dtype=torch.float64))
    g_in = a.T @ torch.randn(5, generator=gen, dtype=torch.float64)
    v = torch.randn(12, generator=gen, dtype=torch.float64)
    g_null = v - a.T @ torch.linalg.solve(gram, a @ v)
    g = torch.stack([g_in, g_null])
    frac = soft_fraction(factor, g @ a.T, g.pow(2).sum(1))
    assert abs(float(frac[0]) - 1) < 1e-8 and float(frac[1]) < 1e-6
    wrong = torch.linalg.cholesky(gram + lam_max * torch.eye(5, dtype=torch.float64))
    assert float(soft_fraction(wrong, g[:1] @ a.T, g[:1].pow(2).sum(1))) < 0.99


@pytest.fixture(scope="module")
def tiny_mlp() -> RemovalContext:
    """N = 12, C = 10, P = 16·6+6+6·10+10 = 172 > N(C−1) = 108: the data GGN has a real null space."""
    scale = tiny_scale(n_train=12, hidden=(6,), activation="tanh", momentum=0.0, lr=0.2, wd=1e-2, batch=4, epochs=2)
    task, data = make_task(scale)
    theta = task.init_params(torch.Generator().manual_seed(3), torch.float64).unsqueeze(0)
    return RemovalContext(
        task=task,
        data=data,
        scale=scale,
        theta_full=theta,
        seeds=[0],
        targets=torch.tensor([1, 4, 7]),
        queries=torch.arange(5),
    )


def explicit_a(ctx: RemovalContext) -> torch.Tensor:
    """A [N(C−1), P] from vmap(jacrev) logit Jacobians and Λ_n^{1/2} (the reference for DataGgn)."""
    theta, x = ctx.theta_full[0], ctx.data.x_train
    jac = vmap(jacrev(lambda th, xi: ctx.task.logits(th, xi.unsqueeze(0)).squeeze(0)), in_dims=(None, 0))(theta, x)
    p = torch.softmax(ctx.task.logits(theta, x), -1)
    ev, vec = torch.linalg.eigh(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))
    rows = (vec[..., 1:] * ev[:, 1:].clamp(min=0).sqrt().unsqueeze(1)).transpose(1, 2)
    return torch.einsum("njc,ncp->njp", rows, jac).flatten(0, 1) / x.shape[0] ** 0.5


def test_data_ggn_factors_equal_explicit_jacobians(tiny_mlp: RemovalContext) -> None:
    """Gram, A·v and AᵀA + wd·I (= methods/influence.py's dense GGN) from the Kronecker factors."""
    ctx, theta = tiny_mlp, tiny_mlp.theta_full[0]
    ggn, a = DataGgn.at(ctx.task, theta, ctx.data.x_train), explicit_a(ctx)
    v = torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float((ggn.gram() - a @ a.T).abs().max()) < EXACT_RTOL * float((a @ a.T).abs().max())
    assert float((ggn.apply_a(v) - v @ a.T).abs().max()) < EXACT_RTOL * float((v @ a.T).abs().max())
    h = dense_curvature(ctx, theta, Curvature.GGN)
    wd = ctx.scale.train.weight_decay
    assert float((a.T @ a + wd * torch.eye(theta.numel(), dtype=torch.float64) - h).abs().max()) < 1e-12


def test_colspace_of_a_training_gradient_and_woodbury_influence(tiny_mlp: RemovalContext) -> None:
    """∇ℓ_k of a training example lies in col(G_data): f ≈ 1; a null-space vector gives f ≈ 0; the Woodbury
    undamped IF equals methods/influence.py's dense IF with damping 0 (G + wd·I inverted exactly)."""
    ctx = replace(tiny_mlp, queries=torch.arange(4))
    theta = ctx.theta_full[0]
    data_as_test = replace(ctx.data, x_test=ctx.data.x_train, y_test=ctx.data.y_train)  # queries = training points
    res = colspace_analysis(replace(ctx, data=data_as_test), 0, (1e-12,))
    assert float((res.fractions[-1, :, 0] - 1).abs().max()) < 1e-6  # the losses of training examples 0…3
    a = explicit_a(ctx)
    g = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g_null = g - a.T @ torch.linalg.lstsq(a.T, g).solution
    ggn = DataGgn.at(ctx.task, theta, ctx.data.x_train)
    gram = ggn.gram()
    factor = torch.linalg.cholesky(
        gram + 1e-12 * float(gram.diagonal().sum()) * torch.eye(gram.shape[0], dtype=torch.float64)
    )
    assert float(soft_fraction(factor, ggn.apply_a(g_null[None]), g_null.pow(2).sum()[None])) < 1e-4
    dense = Influence(InfluenceConfig(curvature=Curvature.GGN, damping_scale=0.0, solver=Solver.DENSE)).predict(ctx)
    res = colspace_analysis(ctx, 0, (1e-9,), dampings=(0.05,))
    assert float((res.if_undamped - dense[0]).abs().max()) < EXACT_RTOL * float(dense.abs().max())
    h = dense_curvature(ctx, theta, Curvature.GGN) + 0.05 * torch.eye(theta.numel(), dtype=torch.float64)
    g_k = torch.func.vmap(
        grad(lambda th, x, y: ctx.task.per_example_loss(th, x[None], y[None]).sum()), in_dims=(None, 0, 0)
    )(theta, ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
    g_m = measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)  # [Q, M, P]
    damped = torch.einsum("qmp,kp->kqm", g_m, torch.linalg.solve(h, g_k.T).T) / ctx.n_train
    assert float((res.if_extra[0] - damped).abs().max()) < 1e-4 * float(damped.abs().max())  # float32 factor


# ------------------------------------------------------------------------------ UD replay and GLM limit
def test_recorded_unroll_equals_unroll_on_each_prefix_run() -> None:
    """One replay recorded at epochs (1, 2) = methods/unroll.py on the 1- and 2-epoch runs (constant lr:
    a shorter run is a prefix of a longer one)."""
    scale = tiny_scale(n_train=24, hidden=(4,), momentum=0.9, lr=0.2, wd=1e-3, batch=8, epochs=2)
    task, data = make_task(scale)
    ctx = RemovalContext(
        task=task,
        data=data,
        scale=scale,
        theta_full=torch.zeros(2, task.n_params, dtype=torch.float64),
        seeds=[0, 5],
        targets=torch.tensor([2, 19]),
        queries=torch.arange(3),
    )
    recorded, _ = unroll_predictions(ctx, (1, 2))
    for i, e in enumerate((1, 2)):
        ref = Unroll().predict(replace(ctx, scale=scale_with(scale, scale.train.lr, e)))
        assert float((recorded[:, i] - ref).abs().max()) < EXACT_RTOL * float(ref.abs().max())


def test_ud_if_correlation_approaches_one_on_a_glm() -> None:
    """Remark 2: for a GLM (multinomial logistic regression, wd = 0.05) UD → IF exactly; with minibatch SGD
    (lr 0.4, B = 24) the UD–IF correlation over (k, q) rises from ≈ 0.95 (1 epoch) to > 0.99 (32 epochs).
    Negative control: pairing target k's IF with target k−1's UD does not correlate."""
    scale = tiny_scale(n_train=48, hidden=(), pool=7, wd=0.05, momentum=0.0, lr=0.4, batch=24, epochs=32)
    task, data = make_task(scale)
    seeds, targets = [0], torch.arange(0, 48, 6)
    scheds = [build_schedule(task.name, 48, scale.train, s, None, Coupling.MASKED) for s in seeds]
    res = train_models(
        task, data, scale.train, scheds, initial_params(task, seeds, torch.float64, "cpu"), checkpoint_models=[0]
    )
    ctx = RemovalContext(
        task=task, data=data, scale=scale, theta_full=res.theta, seeds=seeds, targets=targets, queries=torch.arange(6)
    )
    ud, _ = unroll_predictions(ctx, (1, 32))
    corr, misaligned = [], []
    for i, e in enumerate((1, 32)):
        ctx_e = replace(ctx, scale=scale_with(scale, 0.4, e), theta_full=res.checkpoints[:, e].contiguous())
        pred = Influence(InfluenceConfig(damping_scale=0.0, solver=Solver.DENSE)).predict(ctx_e)
        for out, p in ((corr, pred), (misaligned, pred.roll(1, dims=1))):
            out.append(float(rowwise_pearson(ud[:, i].reshape(1, -1).numpy(), p.reshape(1, -1).numpy())[0]))
    assert corr[1] > 0.99 and corr[1] > corr[0] + 0.02
    assert max(abs(c) for c in misaligned) < 0.5


# ------------------------------------------------------------------------------ (iii) the CSV
def test_run_mechanism_writes_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        SCALES, "tiny", tiny_scale(n_train=40, hidden=(4,), momentum=0.0, lr=0.2, wd=1e-2, batch=8, epochs=2)
    )
    cfg = MechanismConfig(
        lrs=(0.2, 0.1),
        epochs=(1, 2),
        n_seeds=2,
        n_targets=3,
        n_queries=3,
        colspace_epochs=(2,),
        colspace_seeds=1,
        downweight_seeds=4,
        n_boot=10,
    )
    store = UnitStore(tmp_path / "cache")
    frame = run_mechanism("mnist_mlp", "tiny", store, tmp_path, torch.device("cpu"), progress=False, config=cfg)
    written = pd.read_csv(tmp_path / "mnist_mlp" / "tiny" / "mechanism.csv")
    assert set(written["section"]) == {"ud_vs_if", "colspace", "downweighting", "timing"}
    assert len(written) == len(frame)
    corr = written[(written.section == "ud_vs_if") & (written.metric == "pearson")]
    assert corr["value"].between(-1, 1).all()
    assert len(corr[corr.variant != "time_damped"]) == 2 * 2 * 2 * 2  # lr × epoch × (damped, undamped) × measurement
    assert set(corr[corr.variant == "time_damped"]["epoch"]) == {2}  # the column-space checkpoints only
    assert (corr["time"] == corr["lr"] * corr["epoch"] * 5).all()  # η·t, 5 steps per epoch
    frac = written[written.metric == "colspace_fraction"]
    assert frac["value"].between(0, 1).all() and set(frac["variant"]) == {"mu=wd", "rtol=1e-09"}
    scored = written[(written.section == "downweighting") & (written.metric == "loo_mean_spearman")]
    assert set(scored["variant"]) == {"downweighted", "retraining_loo"} and "noise_ceiling" in set(scored["method"])
    run_dir = tmp_path / "mnist_mlp" / "tiny"
    lines = mechanism_report_lines(run_dir, run_dir / "plots", run_dir)
    assert sum(line.startswith("![") for line in lines) == 3
    assert (run_dir / "plots" / "mechanism_colspace.png").is_file()
    claims = mechanism_claims(run_dir)
    assert len(claims) == 2 and {c["verdict"] for c in claims} <= VERDICTS
    again = run_mechanism("mnist_mlp", "tiny", store, tmp_path, torch.device("cpu"), progress=False, config=cfg)
    same = frame["section"] != "timing"
    cached = again[same & ~frame["metric"].eq("train_s_per_seed")]
    pd.testing.assert_frame_equal(cached, frame[same & ~frame["metric"].eq("train_s_per_seed")])


def test_config_errors_name_the_field() -> None:
    with pytest.raises(OptionError, match="colspace_epochs"):
        MechanismConfig(epochs=(1, 5), colspace_epochs=(20,))
    with pytest.raises(OptionError, match="downweight_seeds"):
        MechanismConfig(downweight_seeds=3)
    with pytest.raises(OptionError, match="epochs"):
        MechanismConfig(epochs=(5, 1))
