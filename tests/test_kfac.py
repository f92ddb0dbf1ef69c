"""K-FAC / EK-FAC against the exact block Gauss–Newton matrix, and EK-FAC influence against exact influence."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from benchmark.config import Coupling
from benchmark.engine import build_schedule, initial_params, train_models
from methods.base import RemovalContext, example_loss_grads, measurement_grads
from methods.influence import Curvature, Influence, InfluenceConfig, dense_curvature
from methods.kfac import FisherType, KroneckerCurvature, fit_kronecker, layer_blocks
from tasks.mnist_mlp import MnistMlp
from tests.conftest import make_task, tiny_scale

EXACT_ATOL = 1e-12
# EK-FAC influence vs exact damped-GGN influence (Spearman over all (target, query) pairs, per seed and
# measurement, averaged; λ = 0.1·mean eigenvalue). Measured on this 2-layer ReLU softmax MLP (P = 1,930,
# N = 512): EK-FAC 0.544 (Pearson 0.851), grad_dot 0.07, and the *exact* block-diagonal GGN 0.890 (Pearson
# 0.976). Every layer-wise curvature (K-FAC, EK-FAC, kronfluence's) is an approximation of that
# block-diagonal matrix, so 0.89 is the ceiling of the whole family here, below the 0.9 the issue hoped for;
# kronfluence's EK-FAC equals ours (test_ekfac_influence_matches_kronfluence). See README "Tests".
EKFAC_SPEARMAN_MIN = 0.45
EKFAC_OVER_GRAD_DOT_MIN = 0.3


class TinyConvTask(MnistMlp):
    """A conv net on 7×7 pooled digits (Conv2d 1→3 k3 → ReLU → Linear 75→10) to exercise Conv2d blocks."""

    def build_module(self) -> nn.Module:
        return nn.Sequential(nn.Unflatten(1, (1, 7, 7)), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(147, 10))

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(p.shape)) for n, p in self._template.named_parameters()]

    def __init__(self, scale) -> None:  # noqa: ANN001
        super().__init__(scale)
        self._template = self.build_module().double()  # built outside any vmap (init draws random numbers)

    def logits_batched(self, theta: Tensor, x: Tensor) -> Tensor:
        mod = self._template
        names = [n for n, _ in mod.named_parameters()]
        out = []
        for th, xb in zip(theta, x):
            params = dict(zip(names, self.unflatten(th).values()))
            out.append(torch.func.functional_call(mod, params, (xb,)))
        return torch.stack(out)


def exact_block_fisher(task: MnistMlp, theta: Tensor, x: Tensor, y: Tensor, fisher: FisherType,
                       seed: int = 0) -> Tensor:
    """(1/N)Σ_n E_y[∇ℓ_n ∇ℓ_nᵀ] [P, P] from per-example gradients (the matrix K-FAC approximates)."""
    logits = task.logits(theta, x)
    p = torch.softmax(logits, -1)
    if fisher is FisherType.EXACT:
        labels = [(torch.full_like(y, c), p[:, c].sqrt()) for c in range(p.shape[1])]
    elif fisher is FisherType.SAMPLED:
        gen = torch.Generator().manual_seed(seed)
        labels = [(torch.multinomial(p.detach(), 1, generator=gen).squeeze(1), torch.ones_like(p[:, 0]))]
    else:
        labels = [(y, torch.ones_like(p[:, 0]))]
    out = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for lab, w in labels:
        g = example_loss_grads(task, theta, x, lab) * w.detach().unsqueeze(1)
        out += g.T @ g
    return out / x.shape[0]


def trained_theta(task: MnistMlp, data, seed: int = 0) -> Tensor:
    sched = build_schedule(task.name, data.n_train, task.scale.train, seed, None, Coupling.MASKED)
    theta0 = initial_params(task, [seed], torch.float64, "cpu")
    return train_models(task, data, task.scale.train, [sched], theta0).theta[0]


def block(mat: Tensor, curv: KroneckerCurvature, i: int) -> Tensor:
    ix = curv.blocks[i].param_index
    return mat[ix[:, None], ix[None, :]]


@pytest.mark.parametrize("task_kind", ["mlp", "conv"])
@pytest.mark.parametrize("fisher", list(FisherType))
def test_ekfac_is_never_further_from_the_block_fisher_than_kfac(task_kind: str, fisher: FisherType) -> None:
    scale = tiny_scale(n_train=48, hidden=(8,), activation="relu", pool=4, epochs=3)
    task = MnistMlp(scale) if task_kind == "mlp" else TinyConvTask(scale)
    data = task.load_data().to("cpu", torch.float64)
    theta = trained_theta(task, data) if task_kind == "mlp" else task.init_params(torch.Generator().manual_seed(0),
                                                                                  torch.float64)
    exact = exact_block_fisher(task, theta, data.x_train, data.y_train, fisher, seed=3)
    # sampled labels: one chunk, so the fit draws the same labels as the reference (the same samples)
    chunk = data.n_train if fisher is FisherType.SAMPLED else 20
    kw = dict(fisher=fisher, weight_decay=0.0, seed=3, chunk=chunk)
    kfac = fit_kronecker(task, [theta], data.x_train, data.y_train, kind="kfac", **kw)
    ekfac = fit_kronecker(task, [theta], data.x_train, data.y_train, kind="ekfac", **kw)
    assert len(kfac.blocks) == 2 and kfac.uncovered_fraction == 0.0
    for i in range(2):
        g = block(exact, ekfac, i)
        err_ek = float((g - ekfac.dense_block(i)).norm())
        err_k = float((g - kfac.dense_block(i)).norm())
        assert err_ek <= err_k + EXACT_ATOL
        # EK-FAC's eigenvalues are the diagonal of G in its basis: same trace as G
        assert float(ekfac.eigen[i].sum()) == pytest.approx(float(g.trace()), rel=1e-10)
        # negative control: any other eigenvalues in that basis are further from G
        worse = ekfac.q_a, ekfac.q_s, [e * 1.2 for e in ekfac.eigen]
        worse_curv = KroneckerCurvature(ekfac.blocks, *worse, 0.0, ekfac.n_params, ekfac.kind, ekfac.fisher)
        assert float((g - worse_curv.dense_block(i)).norm()) > err_ek


def test_kronecker_factors_are_exact_for_one_example_and_the_exact_fisher_is_the_ggn() -> None:
    scale = tiny_scale(n_train=48, hidden=(8,), activation="tanh", pool=4, wd=0.0)
    task, data = make_task(scale)
    theta = trained_theta(task, data)
    x1, y1 = data.x_train[:1], data.y_train[:1]
    exact1 = exact_block_fisher(task, theta, x1, y1, FisherType.EXACT)
    for kind in ("kfac", "ekfac"):
        curv = fit_kronecker(task, [theta], x1, y1, kind=kind, fisher="exact", weight_decay=0.0)
        for i in range(2):  # one example, one location: G_n = Σ_c p_c g_c g_cᵀ ⊗ a aᵀ is a Kronecker product
            assert torch.allclose(curv.dense_block(i), block(exact1, curv, i), atol=EXACT_ATOL)
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=theta[None], seeds=[0],
                         targets=torch.arange(2), queries=torch.arange(2))
    ggn = dense_curvature(ctx, theta, Curvature.GGN)  # wd = 0
    assert torch.allclose(exact_block_fisher(task, theta, data.x_train, data.y_train, FisherType.EXACT), ggn,
                          atol=EXACT_ATOL)
    # with two examples K-FAC is no longer exact (negative control)
    two = fit_kronecker(task, [theta], data.x_train[:2], data.y_train[:2], kind="kfac", fisher="exact",
                        weight_decay=0.0)
    exact2 = exact_block_fisher(task, theta, data.x_train[:2], data.y_train[:2], FisherType.EXACT)
    assert not torch.allclose(two.dense_block(0), block(exact2, two, 0), atol=1e-6)


def test_ekfac_inverse_matches_its_dense_matrix() -> None:
    scale = tiny_scale(n_train=48, hidden=(8,), activation="tanh", pool=4, wd=1e-2)
    task, data = make_task(scale)
    theta = trained_theta(task, data)
    curv = fit_kronecker(task, [theta], data.x_train, data.y_train, kind="ekfac", fisher="sampled",
                         weight_decay=1e-2)
    dense = torch.zeros(task.n_params, task.n_params, dtype=torch.float64)
    for i, b in enumerate(curv.blocks):
        dense[b.param_index[:, None], b.param_index[None, :]] = curv.dense_block(i)
    dense += 1e-2 * torch.eye(task.n_params, dtype=torch.float64)
    assert curv.mean_eigenvalue() == pytest.approx(float(dense.trace()) / task.n_params, rel=1e-12)
    v = torch.randn(3, task.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = 0.1 * curv.mean_eigenvalue()
    expected = torch.linalg.solve(dense + lam * torch.eye(task.n_params, dtype=torch.float64), v.T).T
    assert torch.allclose(curv.inverse_hvp(v, lam), expected, rtol=1e-9, atol=EXACT_ATOL)


def spearman_mean(a: Tensor, b: Tensor) -> float:
    vals = [spearmanr(a[s, ..., j].flatten(), b[s, ..., j].flatten())[0] for s in range(a.shape[0])
            for j in range(a.shape[-1])]
    return float(sum(vals) / len(vals))


def block_diagonal_influence(task: MnistMlp, ctx: RemovalContext, theta: Tensor) -> Tensor:
    """(1/N)∇mᵀ(H_bd + λI)⁻¹∇ℓ_k [K, Q, M] with H_bd the exact GGN (+ wd·I) with every cross-layer block zeroed
    and λ = 0.1 × its mean eigenvalue (the trace is unchanged): the best any layer-wise curvature can do."""
    ggn = dense_curvature(ctx, theta, Curvature.GGN)
    mask = torch.zeros_like(ggn, dtype=torch.bool)
    for b in layer_blocks(task.build_module()):
        mask[b.param_index[:, None], b.param_index[None, :]] = True
    block = torch.where(mask, ggn, torch.zeros_like(ggn))
    lam = 0.1 * float(block.trace()) / block.shape[0]
    g_k = example_loss_grads(task, theta, ctx.data.x_train[ctx.targets], ctx.data.y_train[ctx.targets])
    solved = torch.linalg.solve(block + lam * torch.eye(block.shape[0], dtype=block.dtype), g_k.T).T
    return torch.einsum("kp,qmp->kqm", solved, measurement_grads(task, theta, ctx.x_query, ctx.y_query)) / ctx.n_train


def test_ekfac_influence_tracks_exact_ggn_influence_and_beats_grad_dot() -> None:
    scale = tiny_scale(n_train=512, hidden=(32,), activation="relu", pool=4, epochs=10, momentum=0.0, lr=0.1,
                       batch=32, wd=1e-3)
    task, data = make_task(scale)
    seeds = [0, 1]
    theta = torch.stack([trained_theta(task, data, s) for s in seeds])
    ctx = RemovalContext(task=task, data=data, scale=scale, theta_full=theta, seeds=seeds,
                         targets=torch.arange(0, 512, 16), queries=torch.arange(20))
    exact = Influence(InfluenceConfig(solver="dense")).predict(ctx)  # damped GGN, λ = 0.1 · mean eigenvalue
    method = Influence(InfluenceConfig(curvature="ekfac", fisher="exact"))
    ekfac = method.predict(ctx)
    assert method.info["damping_over_mean_eig"] == pytest.approx(0.1)
    grad_dot = torch.stack([torch.einsum("kp,qmp->kqm",
                                         example_loss_grads(task, theta[s], data.x_train[ctx.targets],
                                                            data.y_train[ctx.targets]),
                                         measurement_grads(task, theta[s], ctx.x_query, ctx.y_query))
                            for s in range(2)])
    block_diag = torch.stack([block_diagonal_influence(task, ctx, theta[s]) for s in range(2)])
    rho_ekfac, rho_grad_dot = spearman_mean(ekfac, exact), spearman_mean(grad_dot, exact)
    rho_block = spearman_mean(block_diag, exact)
    print(f"ekfac_vs_exact_spearman={rho_ekfac:.3f} grad_dot_vs_exact_spearman={rho_grad_dot:.3f} "
          f"exact_block_diagonal_vs_exact_spearman={rho_block:.3f}")
    # the hierarchy: full GGN > its exact block diagonal (the layer-wise family's ceiling) > EK-FAC > grad_dot
    assert rho_block > rho_ekfac
    assert rho_ekfac >= EKFAC_SPEARMAN_MIN
    assert rho_ekfac >= rho_grad_dot + EKFAC_OVER_GRAD_DOT_MIN
    assert spearman_mean(ekfac.roll(1, dims=1), exact) < EKFAC_SPEARMAN_MIN  # misaligned targets fail
    assert not math.isnan(rho_ekfac)


def test_kronecker_option_errors() -> None:
    with pytest.raises(ValueError, match="leave solver at 'auto'"):
        InfluenceConfig(curvature="ekfac", solver="dense")
    with pytest.raises(ValueError, match="fisher must be one of: exact, sampled, true"):
        InfluenceConfig(curvature="ekfac", fisher="empirical")


def test_ekfac_influence_matches_kronfluence() -> None:
    """influence(curvature=ekfac) vs kronfluence_ekfac, matched Fisher and damping. True-label Fisher: the
    same matrix, so the same numbers. Sampled Fisher: Spearman against kronfluence next to its ceiling,
    kronfluence against itself with other sampled labels (two factor fits). Measured: true ≈ 1.0000;
    sampled ours-vs-kronfluence 0.881 against a ceiling of 0.884."""
    pytest.importorskip("kronfluence")
    from methods.kronfluence_ekfac import KronfluenceConfig, KronfluenceEkfac

    scale = tiny_scale(n_train=128, hidden=(16,), activation="relu", pool=4, epochs=4, momentum=0.0, lr=0.1)
    task, data = make_task(scale)
    theta = trained_theta(task, data)

    def context(label: int) -> RemovalContext:  # the seed label only changes the sampled Fisher labels
        return RemovalContext(task=task, data=data, scale=scale, theta_full=theta[None], seeds=[label],
                              targets=torch.arange(0, 128, 4), queries=torch.arange(12))

    ours = Influence(InfluenceConfig(curvature="ekfac", fisher="true")).predict(context(0))
    theirs = KronfluenceEkfac(KronfluenceConfig(fisher="true")).predict(context(0))
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-6
    ours_s = Influence(InfluenceConfig(curvature="ekfac", fisher="sampled")).predict(context(0))
    theirs_a = KronfluenceEkfac(KronfluenceConfig(fisher="sampled")).predict(context(0))
    theirs_b = KronfluenceEkfac(KronfluenceConfig(fisher="sampled")).predict(context(1))
    rho, ceiling = spearman_mean(ours_s, theirs_a), spearman_mean(theirs_b, theirs_a)
    print(f"sampled: ours_vs_kronfluence={rho:.4f} kronfluence_vs_itself={ceiling:.4f}")
    assert rho >= ceiling - 0.05
    assert spearman_mean(ours_s.roll(1, dims=1), theirs_a) < ceiling - 0.3  # misaligned targets fail
