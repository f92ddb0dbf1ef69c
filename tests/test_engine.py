"""The batched engine equals a plain torch.optim loop; the three couplings differ exactly as specified."""

from __future__ import annotations

import pytest
import torch

from benchmark.config import Coupling, TrainConfig
from benchmark.engine import (
    build_schedule,
    init_seed,
    initial_params,
    learning_rates,
    order_seed,
    permutations,
    train_models,
)
from benchmark.reference_training import train_torch_loop, train_vmap_ensemble
from tests.conftest import ENGINE_ATOL, make_task, tiny_scale


@pytest.mark.parametrize("coupling", list(Coupling))
@pytest.mark.parametrize(("schedule", "momentum"), [("constant", 0.0), ("triangular", 0.9), ("linear", 0.5)])
def test_engine_equals_torch_loop(coupling: Coupling, schedule: str, momentum: float) -> None:
    scale = tiny_scale(n_train=49, hidden=(8, 6), activation="relu", batch=16, epochs=2)
    scale = scale.__class__(**{**scale.__dict__, "train": TrainConfig(lr=0.2, momentum=momentum, weight_decay=1e-3,
                                                                      batch_size=16, epochs=2, lr_schedule=schedule)})
    task, data = make_task(scale)
    runs = [(0, None), (0, 3), (0, 48), (1, None), (1, 17)]  # 48: N mod B = 1 → last batch emptied when deleted
    schedules = [build_schedule(task.name, data.n_train, scale.train, s, r, coupling) for s, r in runs]
    theta0 = initial_params(task, [s for s, _ in runs], torch.float64, "cpu", [r for _, r in runs], coupling)
    theta0_copy = theta0.clone()
    batched = train_models(task, data, scale.train, schedules, theta0).theta
    assert torch.equal(theta0, theta0_copy)  # the engine never mutates its input
    loop = torch.stack([train_torch_loop(task, data, scale.train, s, t) for s, t in zip(schedules, theta0)])
    assert (batched - loop).abs().max().item() < ENGINE_ATOL
    # negative control: a different seed's schedule must not match
    other = train_torch_loop(task, data, scale.train, schedules[3], theta0[0])
    assert (batched[0] - other).abs().max().item() > 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_engine_equals_vmap_ensemble(momentum: float) -> None:
    scale = tiny_scale(n_train=64, hidden=(8,), activation="relu", momentum=momentum)
    task, data = make_task(scale)
    sched = build_schedule(task.name, data.n_train, scale.train, 0, None, Coupling.MASKED)
    theta0 = initial_params(task, [0, 1, 2], torch.float64, "cpu")
    ours = train_models(task, data, scale.train, [sched] * 3, theta0).theta
    theirs = train_vmap_ensemble(task, data, scale.train, sched, theta0)
    assert (ours - theirs).abs().max().item() < ENGINE_ATOL


def test_couplings_differ_exactly_as_specified() -> None:
    scale = tiny_scale(n_train=50, batch=16, epochs=3)
    cfg, n, k = scale.train, 50, 7
    full = build_schedule("t", n, cfg, 5, None, Coupling.MASKED)
    masked = build_schedule("t", n, cfg, 5, k, Coupling.MASKED)
    deleted = build_schedule("t", n, cfg, 5, k, Coupling.DELETED)
    indep = build_schedule("t", n, cfg, 5, k, Coupling.INDEPENDENT)
    # masked: same batches, weight 0 exactly at k's slots, B unchanged
    assert torch.equal(masked.idx, full.idx) and torch.equal(masked.denom, full.denom)
    assert torch.equal(masked.weight == 0, (full.idx == k) & (full.weight > 0) | (full.weight == 0))
    assert int((masked.weight[full.idx == k] == 0).sum()) == cfg.epochs
    # deleted: each epoch's permutation minus k, re-chunked; k never appears with weight
    perms = permutations(n, cfg.epochs, order_seed("t", 5, None, Coupling.MASKED))
    per_epoch = masked.idx.shape[0] // cfg.epochs
    for e, perm in enumerate(perms):
        rows = deleted.idx[e * per_epoch:(e + 1) * per_epoch][deleted.weight[e * per_epoch:(e + 1) * per_epoch] > 0]
        assert torch.equal(rows, perm[perm != k])
    assert not bool(((deleted.idx == k) & (deleted.weight > 0)).any())
    assert int(deleted.denom.sum()) == (n - 1) * cfg.epochs
    # independent: a fresh order and init for the removal run, k deleted
    assert not torch.equal(indep.idx, deleted.idx)
    assert not bool(((indep.idx == k) & (indep.weight > 0)).any())
    assert init_seed("t", 5, k, Coupling.INDEPENDENT) != init_seed("t", 5, None, Coupling.INDEPENDENT)
    assert init_seed("t", 5, k, Coupling.DELETED) == init_seed("t", 5, None, Coupling.DELETED)


def test_learning_rate_schedules() -> None:
    lr = learning_rates(TrainConfig(lr=1.0, lr_schedule="triangular", peak_fraction=0.25), 8)
    assert lr[0] == 0 and lr[2] == 1.0 and lr.max() == 1.0
    assert torch.allclose(learning_rates(TrainConfig(lr=0.5), 4), torch.full((4,), 0.5, dtype=torch.float64))


def test_diverged_runs_are_flagged() -> None:
    scale = tiny_scale(n_train=32, hidden=(8,), activation="relu")
    scale = scale.__class__(**{**scale.__dict__, "train": TrainConfig(lr=1e30, batch_size=16, epochs=2)})
    task, data = make_task(scale)
    sched = build_schedule(task.name, data.n_train, scale.train, 0, None, Coupling.MASKED)
    data = data.to("cpu", torch.float32)
    res = train_models(task, data, scale.train, [sched], initial_params(task, [0], torch.float32, "cpu"))
    assert bool(res.failed.all())


def test_checkpoints_only_for_requested_models() -> None:
    scale = tiny_scale(n_train=32, hidden=(8,), activation="relu", epochs=3)
    task, data = make_task(scale)
    sched = build_schedule(task.name, data.n_train, scale.train, 0, None, Coupling.MASKED)
    theta0 = initial_params(task, [0, 1, 2], torch.float64, "cpu")
    res = train_models(task, data, scale.train, [sched] * 3, theta0, checkpoint_models=[0, 2])
    assert res.checkpoints is not None and res.checkpoints.shape == (2, scale.train.epochs + 1, task.n_params)
    assert torch.equal(res.checkpoints[:, 0], theta0[[0, 2]])  # epoch 0 is the initialisation
    assert torch.equal(res.checkpoints[:, -1], res.theta[[0, 2]])  # the last epoch end is the final θ
    assert train_models(task, data, scale.train, [sched], theta0[:1]).checkpoints is None


def _loop_schedule(n_train: int, cfg: TrainConfig, seed: int, removed: object, coupling: Coupling,
                   label: object = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The schedule built slot by slot (the definition ``build_schedule`` vectorises)."""
    bsz, per_epoch = cfg.batch_size, -(-n_train // cfg.batch_size)
    idx = torch.zeros(cfg.epochs * per_epoch, bsz, dtype=torch.long)
    weight = torch.zeros(cfg.epochs * per_epoch, bsz, dtype=torch.float64)
    denom = torch.zeros(cfg.epochs * per_epoch, dtype=torch.float64)
    run_id = label if label is not None else removed
    gen = torch.Generator().manual_seed(order_seed("t", seed, run_id, coupling))
    for e in range(cfg.epochs):
        perm = torch.randperm(n_train, generator=gen)
        w = torch.ones(n_train, dtype=torch.float64)
        if removed is not None:
            gone = torch.isin(perm, torch.as_tensor(removed).reshape(-1))
            if coupling is Coupling.MASKED:
                w[gone] = 0.0
            else:
                perm, w = perm[~gone], w[: int((~gone).sum())]
        for j in range(per_epoch):
            chunk = perm[j * bsz:(j + 1) * bsz]
            idx[e * per_epoch + j, :len(chunk)] = chunk
            weight[e * per_epoch + j, :len(chunk)] = w[j * bsz:j * bsz + len(chunk)]
            denom[e * per_epoch + j] = len(chunk)
    return idx, weight, denom


@pytest.mark.parametrize("coupling", list(Coupling))
@pytest.mark.parametrize("n_train,batch", [(40, 8), (37, 8), (10, 16)])
def test_schedule_equals_slot_by_slot_definition(coupling: Coupling, n_train: int, batch: int) -> None:
    cfg = TrainConfig(lr=0.1, batch_size=batch, epochs=3)
    for removed in (None, 3, torch.tensor([0, 5, 9]), torch.arange(0, n_train, 2), torch.arange(n_train - 2)):
        got = build_schedule("t", n_train, cfg, 7, removed, coupling, label="g")
        want = _loop_schedule(n_train, cfg, 7, removed, coupling, label="g")
        for a, b in zip((got.idx, got.weight, got.denom), want):
            assert torch.equal(a, b)


def test_initial_params_draw_each_run_from_its_own_init_seed() -> None:
    task, _ = make_task(tiny_scale())
    seeds, removed = [0, 0, 1, 1], [None, 2, None, 3]
    for coupling in Coupling:
        theta = initial_params(task, seeds, torch.float64, "cpu", removed, coupling)
        for row, s, r in zip(theta, seeds, removed):
            gen = torch.Generator().manual_seed(init_seed(task.name, s, r, coupling))
            assert torch.equal(row, task.init_params(gen, torch.float64))
