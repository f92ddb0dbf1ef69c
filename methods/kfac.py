"""Kronecker-factored Gauss–Newton curvature: K-FAC and EK-FAC for ``nn.Linear`` and ``nn.Conv2d``.

For a layer with inputs a ∈ ℝ^I (a trailing 1 when it has a bias; for a convolution, the unfolded patch
at each of its L locations) and pre-activation output gradients g ∈ ℝ^O, example n's gradient of its loss
is the matrix G_n = Σ_l g_{nl} a_{nl}ᵀ [O, I] (vec row-major: index o·I + i). The layer's block of the
Gauss–Newton matrix of L = (1/N)Σ_n ℓ_n is

    G_block = (1/N) Σ_n E_y[vec(G_n) vec(G_n)ᵀ],    y ~ the label distribution of the Fisher type:

- ``exact``: all C labels weighted by the model's p_c (equals the GGN block exactly: for cross-entropy
  Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ);
- ``sampled``: one label per example drawn from the model (an unbiased estimate of the GGN; seeded);
- ``true``: the training label (the empirical Fisher).

K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) approximates it by S ⊗ A with
A = (1/N)Σ_n (1/L)Σ_l a aᵀ and S = (1/N)Σ_n Σ_l g gᵀ (for L = 1, E[aaᵀ] ⊗ E[ggᵀ]).
EK-FAC (George et al. 2018, eq. (8)–(9)) keeps K-FAC's eigenbasis Q_S ⊗ Q_A and refits the eigenvalues
from the per-example gradients in that basis, Λ = (1/N)Σ_n E_y[(Q_Sᵀ G_n Q_A)²]; this is the diagonal
that minimises ‖G_block − (Q_S⊗Q_A) diag(Λ) (Q_S⊗Q_A)ᵀ‖_F, so it is never further from G than K-FAC
(whose eigenvalues are s_o·a_i) on the same samples.

The curvature of the trained objective adds weight decay, H ≈ blockdiag(Q diag(Λ) Qᵀ) + wd·I, and every
matrix function is elementwise in the eigenbasis: f(H)v = Q_S (f(Λ + wd) ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ per block.
Parameters outside supported layers (e.g. normalisation affines) are not covered: their components are
set to zero (their fraction is reported as ``uncovered_fraction``).

Segment averages (SOURCE, Bae et al. 2024 App. D.2): :func:`fit_kronecker` with several θ averages A and
S over them, eigendecomposes the averages, then refits Λ per θ in that shared basis and averages it.
Batch-norm layers are evaluated in eval mode (per-example independence of the pseudo-gradients).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import parse_enum
from tasks.base import Task

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


class FisherType(str, enum.Enum):
    EXACT = "exact"
    SAMPLED = "sampled"
    TRUE = "true"


class KroneckerKind(str, enum.Enum):
    KFAC = "kfac"
    EKFAC = "ekfac"


@dataclass(frozen=True)
class LayerBlock:
    """One supported layer: its θ indices laid out as the [O, I] matrix (bias as the last column)."""

    name: str
    out_dim: int
    in_dim: int  # including the bias column
    param_index: Tensor  # [O·I] long: θ index of each (o, i) entry, row-major

    def gather(self, vecs: Tensor) -> Tensor:
        """[R, P] → [R, O, I]."""
        return vecs[:, self.param_index].view(vecs.shape[0], self.out_dim, self.in_dim)


def layer_blocks(module: nn.Module) -> list[LayerBlock]:
    """The supported layers of ``module`` in order, with their θ indices (θ = parameters() concatenated)."""
    offsets: dict[int, int] = {}
    offset = 0
    for p in module.parameters():
        offsets[id(p)] = offset
        offset += p.numel()
    blocks = []
    for name, mod in module.named_modules():
        if not isinstance(mod, SUPPORTED_LAYERS):
            continue
        w = mod.weight
        out_dim = w.shape[0]
        w_in = w[0].numel()
        w_idx = offsets[id(w)] + torch.arange(w.numel()).view(out_dim, w_in)
        if mod.bias is not None:
            b_idx = offsets[id(mod.bias)] + torch.arange(out_dim).view(out_dim, 1)
            w_idx = torch.cat([w_idx, b_idx], dim=1)
        blocks.append(LayerBlock(name, out_dim, w_idx.shape[1], w_idx.reshape(-1)))
    return blocks


def _unfold_inputs(mod: nn.Module, x: Tensor) -> Tensor:
    """Layer inputs as [B, L, I] (bias column appended)."""
    if isinstance(mod, nn.Conv2d):
        patches = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        a = patches.transpose(1, 2)  # [B, L, C·kh·kw]
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if mod.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
    return a


def _fold_grads(mod: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as [B, L, O]."""
    if isinstance(mod, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


@contextmanager
def _recording(module: nn.Module) -> Iterator[tuple[list[nn.Module], list[Tensor | None], list[Tensor | None]]]:
    """Record each supported layer's inputs [B, L, I] and output tensor during a forward pass."""
    layers = [m for _, m in module.named_modules() if isinstance(m, SUPPORTED_LAYERS)]
    inputs: list[Tensor | None] = [None] * len(layers)
    outputs: list[Tensor | None] = [None] * len(layers)

    def make_hook(i: int, mod: nn.Module) -> Callable:
        def hook(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[i] = _unfold_inputs(mod, args[0].detach())
            outputs[i] = out
        return hook

    handles = [mod.register_forward_hook(make_hook(i, mod)) for i, mod in enumerate(layers)]
    try:
        yield layers, inputs, outputs
    finally:
        for h in handles:
            h.remove()


def _pseudo_losses(logits: Tensor, y: Tensor, fisher: FisherType, gen: torch.Generator) -> list[Tensor]:
    """The summed losses whose backward passes give the Fisher's per-example pseudo-gradients."""
    if fisher is FisherType.TRUE:
        return [F.cross_entropy(logits, y, reduction="sum")]
    p = torch.softmax(logits.detach().double(), -1)
    if fisher is FisherType.SAMPLED:
        labels = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(logits.device)
        return [F.cross_entropy(logits, labels, reduction="sum")]
    losses = []
    for c in range(logits.shape[-1]):
        labels = torch.full_like(y, c)
        losses.append((p[:, c].sqrt().to(logits.dtype) * F.cross_entropy(logits, labels, reduction="none")).sum())
    return losses


def _passes(module: nn.Module, x: Tensor, y: Tensor, fisher: FisherType, seed: int, chunk: int
            ) -> Iterator[tuple[list[Tensor], list[list[Tensor]]]]:
    """Per chunk of examples: the layers' inputs [b, L, I] and, per pseudo-label pass, output grads."""
    gen = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    try:
        for start in range(0, x.shape[0], chunk):
            xb, yb = x[start:start + chunk], y[start:start + chunk]
            with _recording(module) as (layers, inputs, outputs), torch.enable_grad():
                logits = module(xb)
                losses = _pseudo_losses(logits, yb, fisher, gen)
                outs = [o for o in outputs if o is not None]
                if len(outs) != len(layers):
                    raise ValueError("every nn.Linear / nn.Conv2d of the module must be used exactly once")
                grads: list[list[Tensor]] = [[] for _ in layers]
                for j, loss in enumerate(losses):  # output grads only: no weight-gradient GEMMs
                    for i, g in enumerate(torch.autograd.grad(loss, outs, retain_graph=j < len(losses) - 1)):
                        grads[i].append(_fold_grads(layers[i], g.detach()).double())
            yield [a.double() for a in inputs if a is not None], grads
    finally:
        module.train(was_training)


def _per_example_rotated_sq(a: Tensor, g: Tensor, q_a: Tensor, q_s: Tensor) -> Tensor:
    """Σ_n (Q_Sᵀ G_n Q_A)² [O, I] for G_n = Σ_l g_{nl} a_{nl}ᵀ."""
    if a.shape[1] == 1:  # rank one per example: (Q_Sᵀg)² ⊗ (Q_Aᵀa)², one GEMM
        return ((g[:, 0] @ q_s) ** 2).T @ ((a[:, 0] @ q_a) ** 2)
    grads = torch.einsum("blo,bli->boi", g, a)
    return (q_s.T @ grads @ q_a).pow(2).sum(0)


@dataclass(frozen=True)
class KroneckerCurvature:
    """Block-diagonal K-FAC / EK-FAC curvature of (1/N)Σℓ_n, plus ``weight_decay``·I when applied.

    q_a [I, I], q_s [O, O] per block (float64); eigen [O, I] per block: EK-FAC's refitted Λ or K-FAC's
    s_o·a_i. ``fisher`` and ``kind`` are recorded for the log.
    """

    blocks: list[LayerBlock]
    q_a: list[Tensor]
    q_s: list[Tensor]
    eigen: list[Tensor]
    weight_decay: float
    n_params: int
    kind: KroneckerKind
    fisher: FisherType

    @property
    def n_covered(self) -> int:
        return sum(b.param_index.numel() for b in self.blocks)

    @property
    def uncovered_fraction(self) -> float:
        return 1.0 - self.n_covered / self.n_params

    def mean_eigenvalue(self) -> float:
        """tr(H)/P over the covered parameters, H including weight decay."""
        return float(sum(e.sum() for e in self.eigen)) / self.n_covered + self.weight_decay

    def apply(self, vecs: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """f(H) V for V [R, P] (f elementwise on the eigenvalues Λ + wd); uncovered components → 0."""
        out = torch.zeros_like(vecs)
        for block, q_a, q_s, eig in zip(self.blocks, self.q_a, self.q_s, self.eigen):
            q_a, q_s = q_a.to(vecs), q_s.to(vecs)
            rot = q_s.T @ block.gather(vecs) @ q_a  # [R, O, I]
            rot = rot * fn(eig + self.weight_decay).to(vecs)
            out[:, block.param_index] = (q_s @ rot @ q_a.T).reshape(vecs.shape[0], -1)
        return out

    def inverse_hvp(self, vecs: Tensor, damping: float) -> Tensor:
        """(H + λI)⁻¹ V, V [R, P]."""
        return self.apply(vecs, lambda ev: 1.0 / (ev + damping))

    def dense_block(self, i: int) -> Tensor:
        """Block i of the approximation (without weight decay) as a dense [O·I, O·I] matrix (tests)."""
        basis = torch.kron(self.q_s[i], self.q_a[i])
        return basis @ torch.diag(self.eigen[i].reshape(-1)) @ basis.T


def fit_kronecker(task: Task, thetas: Sequence[Tensor], x: Tensor, y: Tensor, *, kind: KroneckerKind | str,
                  fisher: FisherType | str, weight_decay: float, seed: int = 0, chunk: int = 512
                  ) -> KroneckerCurvature:
    """Fit K-FAC or EK-FAC at θ (one model) or averaged over several θ (a SOURCE segment).

    x [N, ...], y [N] are the training examples. Factors accumulate in float64. Sampled labels are drawn
    from ``seed`` and redrawn identically in the eigenvalue pass (the same gradient samples).
    """
    kind = parse_enum(KroneckerKind, kind, "kind")
    fisher = parse_enum(FisherType, fisher, "fisher")
    modules = [task.module(th) for th in thetas]
    blocks = layer_blocks(modules[0])
    n = x.shape[0]
    a_cov = [torch.zeros(b.in_dim, b.in_dim, dtype=torch.float64, device=x.device) for b in blocks]
    s_cov = [torch.zeros(b.out_dim, b.out_dim, dtype=torch.float64, device=x.device) for b in blocks]
    for mod in modules:
        for inputs, grads in _passes(mod, x, y, fisher, seed, chunk):
            for i, a in enumerate(inputs):
                a_cov[i] += torch.einsum("bli,blj->ij", a, a) / (a.shape[1] * n * len(modules))
                for g in grads[i]:
                    s_cov[i] += torch.einsum("blo,blp->op", g, g) / (n * len(modules))
    q_a, q_s, eigen = [], [], []
    for i in range(len(blocks)):
        ev_a, vec_a = torch.linalg.eigh(0.5 * (a_cov[i] + a_cov[i].T))
        ev_s, vec_s = torch.linalg.eigh(0.5 * (s_cov[i] + s_cov[i].T))
        q_a.append(vec_a)
        q_s.append(vec_s)
        eigen.append(torch.outer(ev_s.clamp(min=0), ev_a.clamp(min=0)))
    if kind is KroneckerKind.EKFAC:
        eigen = [torch.zeros_like(e) for e in eigen]
        for mod in modules:
            for inputs, grads in _passes(mod, x, y, fisher, seed, chunk):
                for i, a in enumerate(inputs):
                    for g in grads[i]:
                        eigen[i] += _per_example_rotated_sq(a, g, q_a[i], q_s[i]) / (n * len(modules))
    n_params = sum(p.numel() for p in modules[0].parameters())
    return KroneckerCurvature(blocks, q_a, q_s, eigen, weight_decay, n_params, kind, fisher)


def train_gradient_scores(curv: KroneckerCurvature, task: Task, theta: Tensor, x: Tensor, y: Tensor,
                          vecs: Tensor, chunk: int = 1024) -> Tensor:
    """⟨v_q, ∇ℓ_n(θ)⟩ over the covered layers for every training example n, [R, N] for V [R, P]
    (e.g. V = (H + λI)⁻¹∇m_q): per-example gradients are never formed — for a layer used once per
    example (L = 1) G_n = g_n a_nᵀ, so ⟨V_q, G_n⟩ = g_nᵀ V_q a_n is one GEMM per chunk."""
    module = task.module(theta).eval()
    mats = [b.gather(vecs) for b in curv.blocks]  # [R, O, I]
    out = []
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        with _recording(module) as (layers, inputs, outputs), torch.enable_grad():
            loss = F.cross_entropy(module(xb), yb, reduction="sum")
            grads = torch.autograd.grad(loss, [o for o in outputs if o is not None])
        score = vecs.new_zeros(vecs.shape[0], xb.shape[0])
        for layer, a, g, mat in zip(layers, inputs, grads, mats):
            g = _fold_grads(layer, g.detach()).to(vecs)
            a = a.to(vecs)
            if a.shape[1] == 1:
                proj = (a[:, 0] @ mat.reshape(-1, mat.shape[-1]).T).view(a.shape[0], *mat.shape[:2])  # [b, R, O]
                score += torch.einsum("bro,bo->rb", proj, g[:, 0])
            else:
                score += torch.einsum("blo,roi,bli->rb", g, mat, a)
        out.append(score)
    return torch.cat(out, dim=1)
