"""The CIFAR-10 ResNet-9 task: w-weighted BatchNorm (masked coupling removes an example from the batch
statistics too), augmentation keyed by (seed, example, epoch), evaluation-mode BatchNorm, and unroll against
exact retraining through augmentation and training-mode BatchNorm."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmark.config import Coupling, GroundTruthConfig, LRSchedule, ResNetConfig, TaskScale, TrainConfig
from benchmark.engine import build_schedule, initial_params, train_models
from methods.base import RemovalContext, measurement_grads
from methods.unroll import Unroll, UnrollConfig
from tasks.base import TaskData, cross_entropy
from tasks.cifar import black
from tasks.cifar_resnet import CifarResnet, batch_stats, resnet9_forward


def tiny_task(width: int = 2, n_train: int = 16, epochs: int = 2) -> CifarResnet:
    scale = TaskScale(n_train=n_train, model=ResNetConfig(width=width, bn_calibration=8),
                      train=TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8, epochs=epochs,
                                        lr_schedule=LRSchedule.TRIANGULAR, peak_fraction=0.2),
                      ground_truth=GroundTruthConfig(n_seeds=4, n_targets=2, n_queries=2), query_pool=8)
    task = CifarResnet(scale)
    gen = torch.Generator().manual_seed(0)
    task.__dict__["_calibration_cpu"] = torch.randn(8, 3, 32, 32, generator=gen)  # no data files needed
    return task


def tiny_data(n_train: int = 16, n_test: int = 8) -> TaskData:
    gen = torch.Generator().manual_seed(1)
    return TaskData(x_train=torch.randn(n_train, 3, 32, 32, generator=gen, dtype=torch.float64),
                    y_train=torch.randint(0, 10, (n_train,), generator=gen),
                    x_test=torch.randn(n_test, 3, 32, 32, generator=gen, dtype=torch.float64),
                    y_test=torch.randint(0, 10, (n_test,), generator=gen), train_index=torch.arange(n_train))


def test_weighted_batchnorm_masks_an_example_out_of_the_batch_statistics() -> None:
    task, data = tiny_task(), tiny_data()
    theta = initial_params(task, [0], torch.float64, "cpu")[0]
    p = task.unflatten(theta)
    x, y = data.x_train[:8], data.y_train[:8]
    w = torch.ones(8, dtype=torch.float64)
    w[3] = 0.0
    keep = torch.tensor([i for i in range(8) if i != 3])
    masked = resnet9_forward(p, x, task.resnet.width, w=w)[keep]
    deleted = resnet9_forward(p, x[keep], task.resnet.width, w=torch.ones(7, dtype=torch.float64))
    assert torch.allclose(masked, deleted, atol=1e-12, rtol=0)
    unweighted = resnet9_forward(p, x, task.resnet.width)[keep]  # negative control: plain batch statistics
    assert (unweighted - deleted).abs().max() > 1e-4
    # the training loss the engine and unroll differentiate: also equal, gradient included
    g_masked = torch.func.grad(lambda th: task.batch_loss(th, x, y, w, torch.tensor(7.0)))(theta)
    g_deleted = torch.func.grad(lambda th: task.batch_loss(th, x[keep], y[keep], torch.ones(7, dtype=torch.float64),
                                                          torch.tensor(7.0)))(theta)
    assert torch.allclose(g_masked, g_deleted, atol=1e-12, rtol=0)


def test_batch_stats_match_torch_batchnorm() -> None:
    a = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    mean, var = batch_stats(a, torch.ones(6, dtype=torch.float64))
    ref = torch.nn.functional.batch_norm(a, None, None, training=True, eps=1e-5)
    assert torch.allclose((a - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-5).sqrt(), ref, atol=1e-10)


def test_augmentation_depends_only_on_seed_example_and_epoch() -> None:
    task = tiny_task()
    x = torch.randn(1, 16, 3, 32, 32, dtype=torch.float64)
    idx = torch.arange(16).view(1, 16)
    order = torch.tensor([123456789])
    full = task.augment(x, idx, order, epoch=0)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))[:9]  # another batch: a subset, reordered
    other = task.augment(x[:, perm], idx[:, perm], order, epoch=0)
    assert torch.equal(other, full[:, perm])  # the pairing survives removal and re-batching
    assert not torch.equal(task.augment(x, idx, order, epoch=1), full)
    assert not torch.equal(task.augment(x, idx, order + 1, epoch=0), full)
    # every output is a crop of the black-padded image, possibly flipped
    pad, fill = task.resnet.crop_pad, black().to(torch.float64)
    for i in range(16):
        padded = torch.nn.functional.pad(x[0, i] - fill, (pad,) * 4) + fill
        crops = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(full[0, i], c) or torch.equal(full[0, i], c.flip(-1)) for c in crops)
    flips = [any(torch.equal(full[0, i], (torch.nn.functional.pad(x[0, i] - fill, (pad,) * 4) + fill)
                             [:, dy:dy + 32, dx:dx + 32]) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1))
             for i in range(16)]
    assert 0 < sum(flips) < 16  # some flipped, some not


def test_evaluation_mode_is_per_example_and_matches_the_module() -> None:
    task, data = tiny_task(), tiny_data()
    theta = initial_params(task, [0], torch.float64, "cpu")[0]
    x = data.x_test
    batch = task.logits(theta, x)
    single = torch.cat([task.logits(theta, x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(batch, single, atol=1e-12)  # no batch statistics at evaluation
    assert torch.allclose(task.module(theta)(x), batch, atol=1e-12)
    train_mode = task.logits_grouped({k: v.unsqueeze(0) for k, v in task.unflatten(theta).items()}, x.unsqueeze(0))[0]
    assert (train_mode - batch).abs().max() > 1e-6  # negative control: training mode uses the batch's statistics


def test_masked_removal_run_equals_training_with_zero_weight_and_keeps_others_augmentation() -> None:
    task, data = tiny_task(), tiny_data()
    cfg = task.scale.train
    full = build_schedule(task.name, 16, cfg, 0, None, Coupling.MASKED)
    removed = build_schedule(task.name, 16, cfg, 0, 5, Coupling.MASKED)
    deleted = build_schedule(task.name, 16, cfg, 0, 5, Coupling.DELETED)
    assert full.order == removed.order == deleted.order  # one augmentation stream per seed
    theta0 = initial_params(task, [0, 0], torch.float64, "cpu")
    res = train_models(task, data, cfg, [full, removed], theta0)
    assert torch.isfinite(res.theta).all() and not res.failed.any()
    assert not torch.equal(res.theta[0], res.theta[1])


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_unroll_matches_exact_reweighted_retraining(mode: str) -> None:
    """unroll's Δm = ∇m(θ_T)ᵀ dθ_T/dε for w_k = 1 − ε, with dθ_T/dε by central differences of exact retraining
    (engine: augmentation, w-weighted training-mode BatchNorm), ε = 1e-6, float64. ∇m holds the evaluation-mode
    BatchNorm statistics fixed (the task's convention for every method's gradients)."""
    task, data = tiny_task(), tiny_data()
    cfg = task.scale.train
    targets, queries = torch.tensor([2, 11]), torch.tensor([0, 3])
    theta_full = train_models(task, data, cfg, [build_schedule(task.name, 16, cfg, s, None, Coupling.MASKED)
                                                for s in (0, 1)], initial_params(task, [0, 1], torch.float64, "cpu"))
    ctx = RemovalContext(task=task, data=data, scale=task.scale, theta_full=theta_full.theta, seeds=[0, 1],
                         targets=targets, queries=queries)
    pred = Unroll(UnrollConfig(mode=mode)).predict(ctx)  # [S, K, Q, M]
    eps = 1e-6  # max-pool and ReLU are piecewise: a larger ε (1e-4) can cross a kink and spoil the difference
    for si, seed in enumerate((0, 1)):
        base = build_schedule(task.name, 16, cfg, seed, None, Coupling.MASKED)
        g_m = measurement_grads(task, theta_full.theta[si], data.x_test[queries], data.y_test[queries])  # [Q, M, P]
        for ki, k in enumerate(targets.tolist()):
            thetas = []
            for sign in (1, -1):
                w = base.weight.clone()
                w[base.idx == k] = 1 - sign * eps
                thetas.append(train_models(task, data, cfg, [dataclasses.replace(base, weight=w)],
                                           initial_params(task, [seed], torch.float64, "cpu")).theta[0])
            dtheta = (thetas[0] - thetas[1]) / (2 * eps)  # dθ_T/dε; removal is ε = 1
            assert torch.allclose(pred[si, ki], g_m @ dtheta, atol=1e-8, rtol=1e-5), (pred[si, ki], g_m @ dtheta)
    assert pred.abs().max() > 1e-4  # not trivially zero


def test_training_mode_loss_is_the_engines() -> None:
    """batch_loss (unroll's) equals the engine's weighted batch loss on the same augmented batch."""
    task, data = tiny_task(), tiny_data()
    theta = initial_params(task, [0], torch.float64, "cpu")
    x = task.augment(data.x_train[:8].unsqueeze(0), torch.arange(8).view(1, 8), torch.tensor([7]), 0)
    w = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.float64)
    logits = task.logits_grouped({k: v for k, v in task.unflatten(theta).items()}, x, w)
    engine = (cross_entropy(logits, data.y_train[:8].unsqueeze(0)) * w).sum() / 8
    assert torch.allclose(task.batch_loss(theta[0], x[0], data.y_train[:8], w[0], torch.tensor(8.0)), engine)


def test_cpu_cost_skips_are_lifted_on_a_gpu_and_other_skips_are_not() -> None:
    """A skip for this CPU's cost (e.g. ``source`` at small) does not apply on a CUDA device; dattri_if_cg's
    (memory) does, everywhere; a scale without the entry skips nothing."""
    from benchmark.harness import skip_reason

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert skip_reason("cifar_resnet", "small", "source", cpu) is not None
    assert skip_reason("cifar_resnet", "small", "source", gpu) is None
    assert skip_reason("cifar_resnet", "small", "dattri_if_cg", gpu) is not None
    assert skip_reason("cifar_resnet", "small", "grad_dot", cpu) is None
    assert CifarResnet.cpu_cost_skips <= {m for skips in CifarResnet.method_skips.values() for m in skips}
