"""Wei et al. 2024's gradient family against exact answers: grad_dot vs one explicit SGD step, tracin vs the
Hessian-free unroll, datainf vs Sherman–Morrison computed densely, lissa vs the dense influence solve; the
sign contract on the GLM for each (a ranking check for grad_cos); option errors. Each has a negative control."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from scipy.stats import spearmanr

from benchmark.config import Coupling, LRSchedule, OptionError, TaskScale
from benchmark.engine import build_schedule, initial_params, train_models
from benchmark.registry import METHODS
from methods.base import RemovalContext, example_loss_grads, measurement_grads
from methods.datainf import DataInf, DataInfConfig, layer_groups
from methods.grad_cos import GradCosConfig
from methods.grad_dot import GradDot, GradDotConfig
from methods.influence import Influence, InfluenceConfig, Solver
from methods.lissa import Lissa, LissaConfig
from methods.tracin import TracIn
from tasks.base import TaskData
from tests.conftest import SIGN_PEARSON_MIN, GlmProblem, full_batch_glm_context, make_task, pearson, tiny_scale

EXACT_RTOL = 1e-10  # float64 identities (same maths, different code path), relative to max |reference|
FURTHER_TRAINING_RTOL = 1e-3  # grad_dot vs m(θ′ without k) − m(θ′) after SGD at lr 1e-4 (error O(η))
LISSA_DENSE_RTOL = 1e-6  # lissa (automatic depth, tol 1e-9) vs the dense influence solve, same damping
LISSA_TEST_DAMPING = 10.0  # damping_scale for both (few LiSSA steps on the tiny MLP: σ/(λ + wd) ≈ 5)
LISSA_STOCHASTIC_RTOL = 0.1  # minibatch HVPs (half batches, 3 repeats) vs dense


def rel_err(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pred - ref).abs().max() / ref.abs().max())


def with_train(scale: TaskScale, **changes: object) -> TaskScale:
    """``scale`` with some TrainConfig fields changed."""
    return dataclasses.replace(scale, train=dataclasses.replace(scale.train, **changes))


def masked_runs(ctx: RemovalContext, theta0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train from θ0 [P] on seed 0's schedule: θ′ [P] with every example and θ′_{−k} [K, P] with w_k = 0."""
    sched = ctx.schedule(0)
    scheds = [sched]
    for k in ctx.targets.tolist():
        w = sched.weight.clone()
        w[sched.idx == k] = 0.0
        scheds.append(type(sched)(idx=sched.idx, weight=w, denom=sched.denom))
    theta = train_models(ctx.task, ctx.data, ctx.scale.train, scheds, theta0.expand(len(scheds), -1).clone()).theta
    return theta[0], theta[1:]


def mlp_context(n_train: int, batch: int, epochs: int, lr: float, targets: list[int]) -> RemovalContext:
    """A tanh MLP 16-6-10 whose 'final model' θ_s is a random initialisation (the start of further training)."""
    scale = tiny_scale(n_train=n_train, hidden=(6,), activation="tanh", lr=lr, momentum=0.0, wd=1e-3, batch=batch,
                       epochs=epochs)
    task, data = make_task(scale)
    theta_s = initial_params(task, [7], torch.float64, "cpu")
    return RemovalContext(task=task, data=data, scale=scale, theta_full=theta_s, seeds=[0],
                          targets=torch.tensor(targets), queries=torch.arange(5))


# ---------------------------------------------------------------------------------------------- grad_dot

@pytest.mark.parametrize("misalign_targets", [False, True])
def test_grad_dot_is_the_linearised_one_step_removal(misalign_targets: bool) -> None:
    """One full-batch SGD step from θ_s with and without k: Δθ = θ′_{−k} − θ′ = (η/B)∇ℓ_k(θ_s) exactly, so
    Grad-Dot equals ∇m(θ_s)ᵀΔθ (the step's linearised effect); at lr 1e-4 it also matches the retrained m."""
    ctx = mlp_context(n_train=12, batch=12, epochs=1, lr=0.5, targets=[0, 3, 7, 11])
    pred = GradDot().predict(ctx)[0]  # [K, Q, M]
    theta_s = ctx.theta_full[0]
    full, removed = masked_runs(ctx, theta_s)
    g_m = measurement_grads(ctx.task, theta_s.clone(), ctx.x_query, ctx.y_query)  # [Q, M, P]
    linearised = torch.einsum("kp,qmp->kqm", removed - full, g_m)
    if misalign_targets:
        pred = pred.roll(1, dims=0)
    assert (rel_err(pred, linearised) < EXACT_RTOL) is not misalign_targets

    small = dataclasses.replace(ctx, scale=with_train(ctx.scale, lr=1e-4))  # finite difference of the step
    pred_small = GradDot().predict(small)[0]
    full, removed = masked_runs(small, theta_s)
    m_full = ctx.task.measurements(full, ctx.x_query, ctx.y_query)
    fd = ctx.task.measurements_batched(removed, ctx.x_query, ctx.y_query) - m_full
    if misalign_targets:
        pred_small = pred_small.roll(1, dims=0)
    assert (rel_err(pred_small, fd) < FURTHER_TRAINING_RTOL) is not misalign_targets


@pytest.mark.parametrize("mode", ["schedule", "expected"])
def test_grad_dot_counts_the_seeds_own_steps(mode: str) -> None:
    """6 minibatch steps (B = 8, N = 24, 2 epochs) at a linearly decaying lr from θ_s: the first-order effect
    Σ_t (η_t/B)·𝟙[k∈B_t]·∇m(θ_s)ᵀ∇ℓ_k(θ_s) matches retraining without k. Negative control: the 'expected'
    weight Σ_t η_t/N ignores *when* k was seen, which matters under a decaying lr."""
    ctx = mlp_context(n_train=24, batch=8, epochs=2, lr=1e-4, targets=[0, 5, 13, 23])
    ctx = dataclasses.replace(ctx, scale=with_train(ctx.scale, lr_schedule=LRSchedule.LINEAR))
    pred = GradDot(GradDotConfig(scale=mode)).predict(ctx)[0]
    full, removed = masked_runs(ctx, ctx.theta_full[0])
    m_full = ctx.task.measurements(full, ctx.x_query, ctx.y_query)
    truth = ctx.task.measurements_batched(removed, ctx.x_query, ctx.y_query) - m_full
    assert (rel_err(pred, truth) < FURTHER_TRAINING_RTOL) is (mode == "schedule")


def test_grad_dot_expected_weight() -> None:
    """'expected' = Σ_t η_t/(N(1 − β)) times the plain dot product; with momentum the gain is 1/(1 − β)."""
    ctx = mlp_context(n_train=24, batch=8, epochs=2, lr=0.1, targets=[0, 5])
    ctx = dataclasses.replace(ctx, scale=with_train(ctx.scale, momentum=0.5))
    method = GradDot(GradDotConfig(scale="expected"))
    pred = method.predict(ctx)[0]
    g_k = example_loss_grads(ctx.task, ctx.theta_full[0], ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
    g_m = measurement_grads(ctx.task, ctx.theta_full[0], ctx.x_query, ctx.y_query)
    weight = 6 * 0.1 / (24 * 0.5)
    assert rel_err(pred, weight * torch.einsum("kp,qmp->kqm", g_k, g_m)) < EXACT_RTOL
    assert method.info["step_weight_mean"] == pytest.approx(weight)
    # constant lr, B | N: each example is in one batch per epoch, so the seed's schedule gives the same weight
    assert rel_err(GradDot().predict(ctx)[0], pred) < EXACT_RTOL


# ---------------------------------------------------------------------------------------------- tracin

def hessian_free_unroll(ctx: RemovalContext, lr: float, end_of_step: bool) -> torch.Tensor:
    """Σ_t (η/N)·∇m(θ)ᵀ∇ℓ_k(θ) along an explicit full-batch GD replay, θ = θ_{t+1} (end of step t) or θ_t."""
    task, data, wd = ctx.task, ctx.data, ctx.scale.train.weight_decay

    def objective(th: torch.Tensor) -> torch.Tensor:
        return task.per_example_loss(th, data.x_train, data.y_train).mean() + 0.5 * wd * th.pow(2).sum()

    theta = initial_params(task, [0], torch.float64, "cpu")[0]
    total = 0.0
    for _ in range(ctx.n_steps):
        new = theta - lr * torch.func.grad(objective)(theta)
        at = new if end_of_step else theta
        g_k = example_loss_grads(task, at, data.x_train[ctx.targets], data.y_train[ctx.targets])
        total = total + lr / ctx.n_train * torch.einsum("kp,qmp->kqm", g_k,
                                                         measurement_grads(task, at, ctx.x_query, ctx.y_query))
        theta = new
    assert torch.allclose(theta, ctx.theta_full[0], rtol=0, atol=1e-12)  # the replay is the recorded run
    return total


@pytest.mark.parametrize("variant", ["exact", "start_of_step", "misaligned"])
def test_tracin_is_the_hessian_free_unroll(glm: GlmProblem, variant: str) -> None:
    """Checkpoints after every full-batch GD step: TracIn = Σ_t (η/N)·∇m(θ_{t+1})ᵀ∇ℓ_k(θ_{t+1}), gradients at
    the *end* of each interval. Negative controls: gradients at the start θ_t; targets misaligned."""
    ctx, lr = full_batch_glm_context(glm, 5)
    pred = TracIn().predict(ctx)[0]
    ref = hessian_free_unroll(ctx, lr, end_of_step=variant != "start_of_step")
    if variant == "misaligned":
        pred = pred.roll(1, dims=0)
    assert (rel_err(pred, ref) < EXACT_RTOL) is (variant == "exact")


# ---------------------------------------------------------------------------------------------- datainf

def datainf_dense(ctx: RemovalContext, blocks: list[slice]) -> torch.Tensor:
    """(1/N)Σ_l ∇_l mᵀ [(1/(Nλ_l))Σ_i (I − g_il g_ilᵀ/(λ_l + ‖g_il‖²))] ∇_l ℓ_k, [K, Q, M], built as P_l × P_l."""
    theta = ctx.theta_full[0]
    grads = example_loss_grads(ctx.task, theta, ctx.data.x_train, ctx.data.y_train)  # [N, P]
    g_m = measurement_grads(ctx.task, theta, ctx.x_query, ctx.y_query)
    n = ctx.n_train
    out = 0.0
    for part in blocks:
        g = grads[:, part]
        lam = 0.1 * float(g.pow(2).mean())
        eye = torch.eye(g.shape[1], dtype=torch.float64)
        inv = sum(eye - torch.outer(gi, gi) / (lam + gi @ gi) for gi in g) / (n * lam)
        out = out + torch.einsum("kp,pr,qmr->kqm", g[ctx.targets], inv, g_m[..., part]) / n
    return out


@pytest.mark.parametrize("n_train", [1, 8])
def test_datainf_is_exact_for_one_example(glm: GlmProblem, n_train: int) -> None:
    """One layer (the GLM), N = 1: Sherman–Morrison is exact, DataInf = (1/N)∇mᵀ(G + λI)⁻¹∇ℓ_k with the exact
    inverse. Negative control: N = 8, where swapping average and inverse is only an approximation."""
    d = glm.data
    data = TaskData(d.x_train[:n_train], d.y_train[:n_train], d.x_test, d.y_test, d.train_index[:n_train])
    ctx = RemovalContext(task=glm.task, data=data, scale=glm.task.scale, theta_full=glm.theta.unsqueeze(0), seeds=[0],
                         targets=torch.tensor([0]), queries=torch.arange(10))
    assert [name for name, _ in layer_groups(ctx.task, glm.theta)] == ["0"]
    pred = DataInf().predict(ctx)[0]
    grads = example_loss_grads(ctx.task, glm.theta, data.x_train, data.y_train)  # [N, P]
    lam = 0.1 * float(grads.pow(2).mean())
    fisher = grads.T @ grads / n_train + lam * torch.eye(grads.shape[1], dtype=torch.float64)  # G + λI
    g_m = measurement_grads(ctx.task, glm.theta, ctx.x_query, ctx.y_query)
    exact = torch.einsum("kp,qmp->kqm", torch.linalg.solve(fisher, grads[:1].T).T, g_m) / n_train
    assert (rel_err(pred, exact) < EXACT_RTOL) is (n_train == 1)


@pytest.mark.parametrize("per_layer", [True, False])
def test_datainf_matches_dense_formula(per_layer: bool) -> None:
    """General N, two layers: the vectorised, chunked method equals the per-layer formula built densely.
    Negative control: the same formula with all of θ as one block (the layer grouping matters)."""
    scale = tiny_scale(n_train=20, hidden=(5,), activation="tanh")
    task, data = make_task(scale)
    sched = build_schedule(task.name, 20, scale.train, 0, None, Coupling.MASKED)
    theta = train_models(task, data, scale.train, [sched], initial_params(task, [0], torch.float64, "cpu")).theta
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=theta, seeds=[0],
                         targets=torch.tensor([1, 4, 19]), queries=torch.arange(4))
    layers = layer_groups(task, theta[0])
    assert layers == [("0", slice(0, 16 * 5 + 5)), ("2", slice(85, 85 + 5 * 10 + 10))]
    method = DataInf()
    pred = method.predict(ctx)[0]
    blocks = [part for _, part in layers] if per_layer else [slice(0, task.n_params)]
    assert (rel_err(pred, datainf_dense(ctx, blocks)) < EXACT_RTOL) is per_layer
    assert method.info["n_layers"] == 2.0
    assert rel_err(DataInf(DataInfConfig(chunk=7)).predict(ctx)[0], pred) < EXACT_RTOL  # chunking is exact



# ---------------------------------------------------------------------------------------------- lissa

@pytest.fixture(scope="module")
def tiny_mlp() -> RemovalContext:
    """Two seeds of a trained tanh MLP 16-8-10 (P = 226), as in test_dense_and_cg_agree."""
    scale = tiny_scale(n_train=64, hidden=(8,), activation="tanh")
    task, data = make_task(scale)
    seeds = [0, 1]
    theta = train_models(task, data, scale.train,
                         [build_schedule(task.name, 64, scale.train, s, None, Coupling.MASKED) for s in seeds],
                         initial_params(task, seeds, torch.float64, "cpu")).theta
    return RemovalContext(task=task, data=data, scale=scale, theta_full=theta, seeds=seeds,
                          targets=torch.arange(3), queries=torch.arange(5))


@pytest.mark.parametrize("n_targets", [3, 12])  # 3 ≤ Q·M = 10 recurses on targets; 12 on query gradients
@pytest.mark.parametrize("depth", [None, 10])
def test_lissa_matches_dense_influence(tiny_mlp: RemovalContext, n_targets: int, depth: int | None) -> None:
    """Converged LiSSA (automatic depth for tol 1e-9) = (1/N)∇mᵀ(G + λI)⁻¹∇ℓ_k by eigendecomposition, same GGN,
    same damping λ = 10 × mean eigenvalue (σ/λ ≈ 5 here, ≈ 110 steps). Negative control: depth 10."""
    ctx = dataclasses.replace(tiny_mlp, targets=torch.arange(n_targets))
    dense = Influence(InfluenceConfig(solver=Solver.DENSE, damping_scale=LISSA_TEST_DAMPING)).predict(ctx)
    method = Lissa(LissaConfig(damping_scale=LISSA_TEST_DAMPING, depth=depth, tol=1e-9))
    pred = method.predict(ctx)
    assert (rel_err(pred, dense) < LISSA_DENSE_RTOL) is (depth is None)
    assert (method.info["truncation_bound_max"] <= 1e-9) is (depth is None)


def test_lissa_stochastic_hvps(tiny_mlp: RemovalContext) -> None:
    """Minibatch GGN products (half batches from a seeded generator, 3 repeats averaged): close to dense; the
    same seed reproduces the answer and another seed changes it."""
    ctx = tiny_mlp.subset(1)
    dense = Influence(InfluenceConfig(solver=Solver.DENSE, damping_scale=LISSA_TEST_DAMPING)).predict(ctx)
    cfg = LissaConfig(damping_scale=LISSA_TEST_DAMPING, batch_size=32, repeats=3)
    assert rel_err(Lissa(cfg).predict(ctx), dense) < LISSA_STOCHASTIC_RTOL
    short = dataclasses.replace(cfg, depth=10)
    pred = Lissa(short).predict(ctx)
    assert torch.equal(pred, Lissa(short).predict(ctx))
    assert not torch.equal(pred, Lissa(dataclasses.replace(short, seed=1)).predict(ctx))


def test_lissa_automatic_depth() -> None:
    """J = ⌈σ/(λ + wd)·ln(1/tol)⌉ makes the worst-case factor (1 − (λ + wd)/σ)^(J+1) ≤ tol, and is at most 10 %
    deeper than the smallest such J when (λ + wd)/σ = 0.1; capped at max_depth; an explicit depth wins."""
    cfg = LissaConfig(tol=1e-4)
    depth = cfg.depth_for(damping=0.09, weight_decay=0.01, scale=1.0)
    smallest = math.ceil(math.log(1e-4) / math.log(0.9)) - 1  # 87
    assert depth == 93 and 0.9 ** (depth + 1) <= 1e-4 and depth <= 1.1 * smallest
    assert LissaConfig(max_depth=50).depth_for(0.09, 0.01, 1.0) == 50
    assert LissaConfig(damping_scale=0.0).depth_for(0.0, 0.0, 1.0) == LissaConfig().max_depth
    assert LissaConfig(depth=7).depth_for(0.09, 0.01, 1.0) == 7


# ---------------------------------------------------------------------------------------------- sign contract

@pytest.fixture(scope="module")
def glm_600(glm: GlmProblem) -> tuple[RemovalContext, torch.Tensor]:
    """The GLM trained by 600 full-batch GD steps (checkpoint after every step) and its exact LOO [K, Q, M]."""
    return full_batch_glm_context(glm, 600)[0], glm.exact_loo()


@pytest.mark.parametrize("method", ["grad_dot", "tracin", "datainf", "lissa"])
def test_sign_contract_on_glm(glm_600: tuple[RemovalContext, torch.Tensor], method: str) -> None:
    """Pearson(prediction, exact LOO) > 0.5 for loss and margin; flipping the sign must fail."""
    ctx, truth = glm_600
    pred = METHODS.get(method)().predict(ctx)[0]
    for j in range(2):
        assert pearson(pred[..., j], truth[..., j]) > SIGN_PEARSON_MIN
        assert pearson(-pred[..., j], truth[..., j]) < -SIGN_PEARSON_MIN


def test_grad_cos_ranks_with_exact_loo(glm_600: tuple[RemovalContext, torch.Tensor]) -> None:
    """A ranking-only method: cosines in [−1, 1], Spearman with the exact LOO > 0, < 0 when flipped."""
    ctx, truth = glm_600
    method = METHODS.get("grad_cos")()
    assert method.is_distributional is False
    pred = method.predict(ctx)[0]
    assert float(pred.abs().max()) <= 1 + 1e-12
    for j in range(2):
        rho = spearmanr(pred[..., j].flatten().numpy(), truth[..., j].flatten().numpy()).statistic
        flipped = spearmanr(-pred[..., j].flatten().numpy(), truth[..., j].flatten().numpy()).statistic
        assert rho > 0 > flipped
    # the cosine is Grad-Dot divided by both gradient norms: same sign everywhere
    assert bool((torch.sign(pred) == torch.sign(GradDot().predict(ctx)[0])).all())


# ---------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize(("make", "option"), [
    (lambda: GradDotConfig(scale="uniform"), "scale must be one of: schedule, expected"),
    (lambda: GradCosConfig(eps=-1.0), "eps"),
    (lambda: DataInfConfig(damping_scale=0.0), "damping_scale"),
    (lambda: DataInfConfig(chunk=0), "chunk"),
    (lambda: LissaConfig(depth=0), "depth"),
    (lambda: LissaConfig(scale=-1.0), "scale"),
    (lambda: LissaConfig(scale_safety=0.5), "scale_safety"),
    (lambda: LissaConfig(batch_size=0), "batch_size"),
    (lambda: LissaConfig(repeats=2), "repeats"),
    (lambda: LissaConfig(damping_scale=-0.1), "damping_scale"),
])
def test_option_errors_name_the_option(make: Callable[[], object], option: str) -> None:
    with pytest.raises(OptionError, match=option):
        make()


def test_tracin_needs_checkpoints(glm: GlmProblem) -> None:
    with pytest.raises(ValueError, match="'tracin' needs the training checkpoints"):
        TracIn().predict(glm.ctx)
