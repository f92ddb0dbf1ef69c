"""Tests for benchmark.scores: known answers on synthetic data, naive reference implementations,
controls (oracle, zero, random, misaligned) and the bootstrap / seed-count machinery."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from benchmark import scores as sc
from benchmark.scores import (
    SCORE_NAMES_DISTRIBUTIONAL,
    SCORE_NAMES_FIXED_SEED,
    ScoreResult,
    debiased_w2_squared,
    make_resampling_plan,
    paired_difference_ci,
    rowwise_pearson,
    rowwise_spearman,
    score_method,
    score_split,
    score_vs_seeds,
    signal_to_noise,
    w2_squared,
)

N_BOOT = 40  # enough for the properties tested, keeps the file fast
Data = tuple[np.ndarray, np.ndarray, np.ndarray]
Results = dict[str, ScoreResult]


def make_data(
    n_seeds: int = 64, n_targets: int = 30, n_queries: int = 8, noise: float = 0.3, seed: int = 0
) -> Data:
    """Paired (masked-coupling-like) data: per-seed effect = mu[k, q] + noise, full = base + seed noise."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n_targets, n_queries)) * rng.uniform(0.2, 2.0, size=(n_targets, 1))
    base = rng.normal(size=n_queries) + 2.0
    full = base + rng.normal(size=(n_seeds, n_queries))
    removed = full[:, None, :] + mu + noise * rng.normal(size=(n_seeds, n_targets, n_queries))
    return full, removed, mu


def by_metric(results: list[ScoreResult]) -> dict[str, ScoreResult]:
    return {r.metric: r for r in results}


def broadcast(mu: np.ndarray, n_seeds: int) -> np.ndarray:
    return np.broadcast_to(mu, (n_seeds, *mu.shape)).copy()


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


@pytest.fixture(scope="module")
def good_results(data: Data) -> Results:
    full, removed, mu = data
    return by_metric(score_method(full, removed, broadcast(mu, full.shape[0]), n_boot=N_BOOT, seed=3))


# ----------------------------------------------------------------------------------------------
# Elementary helpers
# ----------------------------------------------------------------------------------------------


def test_w2_squared_hand_computed_cases() -> None:
    assert w2_squared([0.0, 1.0], [1.0, 2.0]) == pytest.approx(1.0)
    assert w2_squared([1.0, 0.0], [2.0, 1.0]) == pytest.approx(1.0)  # unsorted input
    assert w2_squared([3.0, 0.0, 0.0], [2.0, 3.0, 1.0]) == pytest.approx(5.0 / 3.0)  # (0,1),(0,2),(3,3)
    assert w2_squared([5.0], [2.0]) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="equal sample sizes"):
        w2_squared([0.0, 1.0], [0.0, 1.0, 2.0])


def test_w2_squared_vectorised_matches_loop_and_broadcasts() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 5, 3))
    y = rng.exponential(size=(7, 5, 3))
    expected = np.empty((5, 3))
    for i in range(5):
        for j in range(3):
            expected[i, j] = np.mean((np.sort(x[:, i, j]) - np.sort(y[:, i, j])) ** 2)
    np.testing.assert_allclose(w2_squared(x, y, axis=0), expected, rtol=1e-12)
    np.testing.assert_allclose(w2_squared(np.moveaxis(x, 0, 2), np.moveaxis(y, 0, 2), axis=2), expected)
    # broadcasting of the non-sample axes: one [n, Q] sample against [n, K, Q]
    np.testing.assert_allclose(w2_squared(x[:, :1, :], y, axis=0), w2_squared(np.repeat(x[:, :1], 5, 1), y))
    # W2 is symmetric and zero against itself
    np.testing.assert_allclose(w2_squared(x, y), w2_squared(y, x))
    assert np.all(w2_squared(x, x[::-1]) == 0.0)


def test_debiased_w2_hand_case_and_same_law_bias_removed() -> None:
    # x = [0,1,2,3], y = [1,2,3,4]: W2² = 1; half-vs-half W2² = 4 for both => 1 - (4 + 4)/4 = -1
    assert debiased_w2_squared([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(-1.0)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(64, 3000)), rng.normal(size=(64, 3000))
    raw, debiased = w2_squared(x, y).mean(), debiased_w2_squared(x, y).mean()
    assert raw > 0.05  # the finite-sample bias of W2² between two samples of one law
    assert abs(debiased) < 0.15 * raw  # mostly removed
    # a real difference is kept: N(0,1) vs N(0.5, 1.5²) has W2² = 0.5² + 0.5² = 0.5
    y2 = 0.5 + 1.5 * rng.normal(size=(64, 3000))
    assert debiased_w2_squared(x, y2).mean() == pytest.approx(0.5, abs=0.03)
    assert w2_squared(x, y2).mean() > 0.58
    assert np.isnan(debiased_w2_squared([1.0], [2.0]))  # halves of zero points


def test_rowwise_correlations_match_scipy() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 25))
    y = x + rng.normal(size=(6, 25))
    xt = rng.integers(0, 4, size=(6, 25)).astype(float)  # many ties
    for a, b in ((x, y), (xt, y), (xt, np.round(y))):
        spear = rowwise_spearman(a, b)
        pear = rowwise_pearson(a, b)
        for i in range(a.shape[0]):
            assert spear[i] == pytest.approx(stats.spearmanr(a[i], b[i]).statistic, abs=1e-12)
            assert pear[i] == pytest.approx(stats.pearsonr(a[i], b[i]).statistic, abs=1e-12)
    np.testing.assert_allclose(rowwise_spearman(x.T, y.T, axis=0), rowwise_spearman(x, y), atol=1e-14)


def test_rowwise_correlations_nan_for_constant_or_nan_rows() -> None:
    x = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.0, np.nan, 3.0], [0.1, 0.1 + 1e-17, 0.1]])
    y = np.array([[1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spear, pear = rowwise_spearman(x, y), rowwise_pearson(x, y)
    assert spear[0] == pytest.approx(0.5) and pear[0] == pytest.approx(0.5)
    assert np.all(np.isnan(spear[1:3])) and np.all(np.isnan(pear[1:]))


def test_average_ranks_with_ties() -> None:
    ranks = sc._average_ranks(np.array([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(ranks, [[4.0, 1.0, 4.0, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0, 3.0]])


def test_paired_difference_ci() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=200)
    assert paired_difference_ci(a, a) == (0.0, 0.0, 0.0)
    mean, lo, hi = paired_difference_ci(a + 1.0, a)
    assert mean == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    b = a + rng.normal(size=200)
    mean, lo, hi = paired_difference_ci(b, a)
    assert lo < mean < hi
    assert all(math.isnan(v) for v in paired_difference_ci([np.nan], [1.0]))
    with pytest.raises(ValueError, match="same shape"):
        paired_difference_ci(a, a[:-1])


def test_signal_to_noise_known_answer() -> None:
    full = np.zeros((4, 2))
    removed = np.zeros((4, 3, 2))
    removed[:, 0, 0] = [1.0, 1.1, 0.9, 1.0]  # mean 1, sd 0.0816 -> snr 24.5
    removed[:, 1, 0] = [1.0, -1.0, 1.0, -1.0]  # mean 0 -> snr 0
    removed[:, 2, 0] = 5.0  # sd 0, mean 5 -> inf
    snr, frac = signal_to_noise(full, removed)
    assert snr.shape == (3, 2)
    expected = 1.0 / (np.std([1.0, 1.1, 0.9, 1.0], ddof=1) / 2.0)
    assert snr[0, 0] == pytest.approx(expected)
    assert snr[1, 0] == 0.0 and np.isinf(snr[2, 0]) and np.all(snr[:, 1] == 0.0)
    assert frac == pytest.approx(2.0 / 6.0)


# ----------------------------------------------------------------------------------------------
# Cross-fitted scores against a naive per-cell implementation
# ----------------------------------------------------------------------------------------------


def _naive_w2(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.sort(x) - np.sort(y)) ** 2))


def _naive_debiased(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x) // 2
    return _naive_w2(x, y) - (_naive_w2(x[:m], x[m : 2 * m]) + _naive_w2(y[:m], y[m : 2 * m])) / 4


def _naive_corr_mean(pred: np.ndarray, true: np.ndarray, rank: bool) -> float:
    values = []
    for q in range(pred.shape[1]):
        if np.ptp(pred[:, q]) == 0 or np.ptp(true[:, q]) == 0:
            continue
        fn = stats.spearmanr if rank else stats.pearsonr
        values.append(fn(pred[:, q], true[:, q]).statistic)
    return float(np.mean(values)) if values else math.nan


def naive_split_scores(
    full: np.ndarray, removed: np.ndarray, delta: np.ndarray, a: np.ndarray, b: np.ndarray
) -> dict[str, float]:
    _, n_targets, n_queries = removed.shape
    tm, pm, tv, pv, tw, pw = (np.empty((n_targets, n_queries)) for _ in range(6))
    num = den = 0.0
    for k in range(n_targets):
        for q in range(n_queries):
            fa, ra, fb = full[a, q], removed[a, k, q], full[b, q]
            pb = fb + delta[b, k, q]
            tm[k, q] = ra.mean() - fa.mean()
            pm[k, q] = delta[b, k, q].mean()
            tv[k, q] = np.var(ra, ddof=1) - np.var(fa, ddof=1)
            pv[k, q] = np.var(pb, ddof=1) - np.var(fb, ddof=1)
            tw[k, q] = _naive_debiased(fa, ra)
            pw[k, q] = _naive_debiased(fb, pb)
            floor = _naive_w2(fb, fa)
            num += _naive_w2(pb, ra) - floor
            den += _naive_w2(fb, ra) - floor
    return {
        "loo_mean_spearman": _naive_corr_mean(pm, tm, rank=True),
        "loo_mean_pearson": _naive_corr_mean(pm, tm, rank=False),
        "var_influence_spearman": _naive_corr_mean(pv, tv, rank=True),
        "w2_influence_spearman": _naive_corr_mean(pw, tw, rank=True),
        "distribution_skill": 1.0 - num / den,
    }


def test_score_split_matches_naive_reference() -> None:
    full, removed, mu = make_data(n_seeds=21, n_targets=9, n_queries=4, noise=0.7, seed=5)
    rng = np.random.default_rng(6)
    delta = mu + 0.5 * rng.normal(size=removed.shape) * rng.uniform(0.5, 2.0, size=(1, 9, 1))
    perm = rng.permutation(21)
    a, b = perm[:10], perm[10:20]
    got = score_split(full, removed, delta, a, b)
    expected = naive_split_scores(full, removed, delta, a, b)
    assert set(got) == set(SCORE_NAMES_DISTRIBUTIONAL)
    for metric, value in expected.items():
        assert got[metric] == pytest.approx(value, rel=1e-10, abs=1e-12), metric
    # halves with repeated seeds (as in a bootstrap replicate) are handled the same way
    a2, b2 = a[rng.integers(0, 10, 10)], b[rng.integers(0, 10, 10)]
    got2 = score_split(full, removed, delta, a2, b2)
    for metric, value in naive_split_scores(full, removed, delta, a2, b2).items():
        assert got2[metric] == pytest.approx(value, rel=1e-10, abs=1e-12), metric


def test_point_estimate_is_mean_over_plan_splits(data: Data) -> None:
    full, removed, mu = data
    delta = broadcast(mu, full.shape[0]) + np.random.default_rng(7).normal(size=removed.shape)
    results = by_metric(score_method(full, removed, delta, n_splits=5, n_boot=0, seed=11))
    plan = make_resampling_plan(*removed.shape, n_splits=5, n_boot=0, seed=11)
    per_split = [score_split(full, removed, delta, s.half_a, s.half_b) for s in plan.splits]
    for metric in SCORE_NAMES_DISTRIBUTIONAL:
        expected = np.mean([v[metric] for v in per_split])
        assert results[metric].value == pytest.approx(expected, rel=1e-12), metric
    assert all(len(s.half_a) == len(s.half_b) == 32 for s in plan.splits)
    assert all(not set(s.half_a) & set(s.half_b) for s in plan.splits)
    assert math.isnan(results["loo_mean_spearman"].ci_low)  # n_boot = 0


def test_crossfit_replicate_matches_materialised_resample(data: Data) -> None:
    """A replicate's value = the score of the explicitly resampled data (targets, queries, seeds)."""
    full, removed, mu = data
    delta = broadcast(mu, full.shape[0]) + 0.5 * np.random.default_rng(8).normal(size=removed.shape)
    reps = sc.bootstrap_replicates(full, removed, delta, n_boot=3, seed=9, ci_method="percentile")
    plan = make_resampling_plan(*removed.shape, n_boot=3, seed=9)
    for r, rep in enumerate(plan.replicates):
        a_set, b_set = set(rep.split.half_a.tolist()), set(rep.split.half_b.tolist())
        assert not a_set & b_set  # no seed in both halves
        k, q = rep.targets, rep.queries
        expected = score_split(
            full[:, q], removed[:, k][:, :, q], delta[:, k][:, :, q], rep.split.half_a, rep.split.half_b
        )
        for metric in SCORE_NAMES_DISTRIBUTIONAL:
            assert reps[metric][r] == pytest.approx(expected[metric], rel=1e-9, abs=1e-12), metric


@pytest.mark.parametrize("with_ties", [True, False])
def test_fixed_seed_replicate_matches_materialised_resample(with_ties: bool) -> None:
    """The weighted mid-rank trick equals Spearman/Pearson on the expanded resample."""
    full, removed, mu = make_data(n_seeds=12, n_targets=7, n_queries=3, noise=1.0, seed=10)
    rng = np.random.default_rng(11)
    delta = broadcast(mu, 12) + rng.normal(size=removed.shape)
    if with_ties:
        delta = np.round(delta, 0)  # heavy ties
        delta[:, :, 2] = 0.0  # a constant query: nan, ignored
    plan = make_resampling_plan(12, 7, 3, n_boot=4, seed=12)
    fixed = sc._FixedSeed(full, removed, delta, SCORE_NAMES_FIXED_SEED)
    effect = removed - full[:, None, :]
    queries = range(2) if with_ties else range(3)  # query 2 is constant with ties
    point = fixed.point()
    for name, corr in (("loo_seed_spearman", stats.spearmanr), ("loo_seed_pearson", stats.pearsonr)):
        expected = np.mean([corr(delta[..., q].ravel(), effect[..., q].ravel()).statistic for q in queries])
        assert point[name] == pytest.approx(expected, abs=1e-12)
    for rep in plan.replicates:
        got = fixed.replicate(rep)
        s, k = rep.seeds, rep.targets
        exp_p, exp_s = [], []
        for q in rep.queries:
            x, y = delta[s][:, k, q].ravel(), effect[s][:, k, q].ravel()
            if np.ptp(x) == 0:
                continue
            exp_p.append(stats.pearsonr(x, y).statistic)
            exp_s.append(stats.spearmanr(x, y).statistic)
        assert got["loo_seed_pearson"] == pytest.approx(np.mean(exp_p), abs=1e-10)
        assert got["loo_seed_spearman"] == pytest.approx(np.mean(exp_s), abs=1e-10)


# ----------------------------------------------------------------------------------------------
# Controls with known answers
# ----------------------------------------------------------------------------------------------


def test_oracle_reaches_its_ceiling_exactly(data: Data) -> None:
    full, removed, _ = data
    oracle = removed - full[:, None, :]
    results = score_method(full, removed, oracle, n_boot=N_BOOT, seed=1)
    assert [r.metric for r in results] == list(SCORE_NAMES_DISTRIBUTIONAL + SCORE_NAMES_FIXED_SEED)
    for r in results:
        assert r.value == r.noise_ceiling, r.metric
        assert (r.ci_low, r.ci_high) == (r.ceiling_ci_low, r.ceiling_ci_high), r.metric
    fixed = by_metric(results)
    for metric in SCORE_NAMES_FIXED_SEED:
        assert fixed[metric].noise_ceiling == 1.0 and fixed[metric].regime == "fixed_seed"
    # a finite number of seeds keeps the cross-fitted ceiling below 1 but high for this data
    assert 0.9 < fixed["loo_mean_spearman"].noise_ceiling < 1.0


def test_zero_prediction(data: Data) -> None:
    full, removed, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = by_metric(score_method(full, removed, np.zeros_like(removed), n_boot=N_BOOT))
    skill = results["distribution_skill"]
    assert skill.value == 0.0 and skill.ci_low == 0.0 and skill.ci_high == 0.0
    assert np.all(skill.replicates == 0.0)
    for metric in (
        "loo_mean_spearman",
        "loo_mean_pearson",
        "var_influence_spearman",
        "w2_influence_spearman",
    ):
        assert math.isnan(results[metric].value), metric  # constant prediction: no ranking at all
    for metric in SCORE_NAMES_FIXED_SEED:
        assert math.isnan(results[metric].value), metric
    assert results["loo_mean_spearman"].noise_ceiling > 0.9  # the ceiling does not depend on the method


def test_random_prediction_scores_near_zero(data: Data) -> None:
    full, removed, _ = data
    effect = removed - full[:, None, :]
    delta = np.random.default_rng(13).normal(scale=effect.std(), size=removed.shape)
    results = by_metric(score_method(full, removed, delta, n_boot=N_BOOT))
    assert abs(results["loo_mean_spearman"].value) < 0.15
    assert abs(results["loo_seed_spearman"].value) < 0.05
    assert results["distribution_skill"].value < 0.0
    assert results["loo_mean_spearman"].ci_low < 0.0 < results["loo_mean_spearman"].ci_high


def test_good_predictor_near_ceiling_and_misaligned_control(data: Data, good_results: Results) -> None:
    full, removed, mu = data
    good = good_results
    assert good["loo_mean_spearman"].value > 0.95
    assert good["loo_mean_spearman"].value > good["loo_mean_spearman"].noise_ceiling - 0.02
    assert good["distribution_skill"].value > 0.9
    assert good["w2_influence_spearman"].value > 0.9
    # NEGATIVE CONTROL: the same predictions attributed to the wrong targets
    rolled = broadcast(np.roll(mu, 1, axis=0), full.shape[0])
    bad = by_metric(score_method(full, removed, rolled, n_boot=N_BOOT, seed=3))
    for metric in ("loo_mean_spearman", "loo_mean_pearson", "loo_seed_spearman", "w2_influence_spearman"):
        assert abs(bad[metric].value) < 0.2, metric
    assert bad["distribution_skill"].value < 0.0
    # paired difference on shared replicates: clearly positive
    mean, lo, _ = paired_difference_ci(
        good["loo_mean_spearman"].replicates, bad["loo_mean_spearman"].replicates
    )
    point_difference = good["loo_mean_spearman"].value - bad["loo_mean_spearman"].value
    assert lo > 0.5 and mean == pytest.approx(point_difference, abs=0.01)  # centred (up to clipping at 1)


def test_more_seed_noise_lowers_scores_and_ceiling() -> None:
    values = []
    for noise in (0.3, 3.0):
        full, removed, mu = make_data(noise=noise, seed=14)
        results = by_metric(score_method(full, removed, broadcast(mu, 64), n_boot=0))
        values.append((results["loo_mean_spearman"].noise_ceiling, results["loo_seed_spearman"].value))
    (ceil_low_noise, seed_low_noise), (ceil_high_noise, seed_high_noise) = values
    assert ceil_low_noise > 0.97 and ceil_high_noise < ceil_low_noise - 0.1
    assert seed_high_noise < seed_low_noise - 0.3  # the per-seed effect is mostly unpredictable noise


def test_variance_only_effect_ranks_differently_from_mean() -> None:
    """Removal changes the spread, not the mean: the variance score sees it, the mean score cannot."""
    rng = np.random.default_rng(15)
    n_seeds, n_targets, n_queries = 64, 30, 8
    scale = rng.uniform(-0.6, 2.0, size=(n_targets, n_queries))  # removed sd = (1 + scale)
    base = rng.normal(size=n_queries) + 2.0
    full = base + rng.normal(size=(n_seeds, n_queries))
    removed = base + (1.0 + scale) * rng.normal(size=(n_seeds, n_targets, n_queries))
    delta = scale * (full - base)[:, None, :]  # full + delta has sd (1 + scale): right variance change
    var_pred = by_metric(score_method(full, removed, delta, n_boot=N_BOOT))
    assert var_pred["var_influence_spearman"].value > 0.8
    assert var_pred["var_influence_spearman"].noise_ceiling > 0.8
    assert var_pred["w2_influence_spearman"].value > 0.6
    assert var_pred["distribution_skill"].value > 0.3
    assert abs(var_pred["loo_mean_spearman"].value) < 0.2  # means carry no signal here
    assert abs(var_pred["loo_mean_spearman"].noise_ceiling) < 0.2
    # a location-shift predictor has exactly zero predicted variance change: no variance ranking
    shift = by_metric(score_method(full, removed, broadcast(scale, n_seeds), n_boot=0))
    assert math.isnan(shift["var_influence_spearman"].value)
    assert shift["distribution_skill"].value < 0.0
    # ... also for loss-like numbers straddling a power of two, where adding a constant rounds
    # differently on either side and var(x + c) − var(x) is cancellation noise ≫ eps·var
    offset, sd = 1024.0, 0.1
    full_s, removed_s = offset + sd * (full - base), offset + sd * (removed - base)
    shift = by_metric(score_method(full_s, removed_s, sd * broadcast(scale, n_seeds), n_boot=0))
    assert math.isnan(shift["var_influence_spearman"].value)
    rescaled = by_metric(score_method(full_s, removed_s, sd * delta, n_boot=0))
    assert rescaled["var_influence_spearman"].value == pytest.approx(
        var_pred["var_influence_spearman"].value, abs=0.01
    )


# ----------------------------------------------------------------------------------------------
# Bootstrap, reproducibility, options
# ----------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_estimate(good_results: Results) -> None:
    # a location-shift predictor has no variance ranking (nan, see the variance test)
    assert math.isnan(good_results["var_influence_spearman"].value)
    for r in good_results.values():
        assert r.replicates.shape == (N_BOOT,)
        if r.metric == "var_influence_spearman":
            assert math.isnan(r.ci_low) and r.ceiling_ci_low <= r.noise_ceiling <= r.ceiling_ci_high
            continue
        assert r.ci_low <= r.value <= r.ci_high, r.metric
        assert r.ceiling_ci_low <= r.noise_ceiling <= r.ceiling_ci_high, r.metric
        assert r.ci_high - r.ci_low > 0.0, r.metric
        assert paired_difference_ci(r.replicates, r.replicates) == (0.0, 0.0, 0.0)


def test_percentile_replicates_attenuated_and_centering() -> None:
    """Raw replicates re-add seed noise (sit below the point estimate); 'centered' shifts them."""
    full, removed, mu = make_data(noise=3.0, seed=16)
    delta = broadcast(mu, 64)
    raw = by_metric(score_method(full, removed, delta, n_boot=N_BOOT, ci_method="percentile"))
    cen = by_metric(score_method(full, removed, delta, n_boot=N_BOOT, ci_method="centered"))
    r_raw, r_cen = raw["loo_mean_spearman"], cen["loo_mean_spearman"]
    assert r_raw.value == r_cen.value
    assert np.mean(r_raw.replicates) < r_raw.value - 0.02
    assert np.mean(r_cen.replicates) == pytest.approx(r_cen.value)
    np.testing.assert_allclose(np.diff(r_cen.replicates), np.diff(r_raw.replicates), atol=1e-12)
    with pytest.raises(ValueError, match="ci_method"):
        score_method(full, removed, delta, n_boot=2, ci_method="bca")


def test_centred_skill_interval_contains_the_estimate_despite_a_wild_replicate() -> None:
    """distribution_skill replicates are centred on their median: one huge replicate cannot push the interval
    off the estimate. Negative control: mean-centring (the correlations' rule) does exclude it here."""
    from benchmark.scores.resampling import _centre_replicates, _percentile_ci

    reps = np.r_[np.linspace(-1.0, 1.0, 199), -5000.0]
    lo, hi = _percentile_ci(_centre_replicates(reps, 0.3, "distribution_skill"), 0.95)
    assert lo <= 0.3 <= hi
    lo_mean, _ = _percentile_ci(reps + (0.3 - reps.mean()), 0.95)
    assert lo_mean > 0.3


def test_oracle_memo_serves_every_method_with_identical_scores(data: Data) -> None:
    """The oracle (noise ceiling) is computed once per ground truth, not per method: a second method's scores
    and ceilings with the memo equal those computed from scratch, bit for bit, and hit the memo. Negative
    control: another ground truth (a changed truth array) is a miss."""
    from benchmark.scores.cross_fit import ORACLE_MEMO

    full, removed, mu = data
    delta_a = broadcast(mu, 64)
    delta_b = delta_a + np.random.default_rng(3).normal(size=removed.shape)
    ORACLE_MEMO.clear()
    fresh = score_method(full, removed, delta_b, n_boot=20, seed=1)
    curve_fresh = score_vs_seeds(full, removed, delta_b, n_subsets=3)
    ORACLE_MEMO.clear()
    score_method(full, removed, delta_a, n_boot=20, seed=1)
    score_vs_seeds(full, removed, delta_a, n_subsets=3)
    hits = ORACLE_MEMO.hits
    memo = score_method(full, removed, delta_b, n_boot=20, seed=1)
    curve_memo = score_vs_seeds(full, removed, delta_b, n_subsets=3)
    assert ORACLE_MEMO.hits > hits
    for a, b in zip(fresh, memo, strict=True):
        np.testing.assert_equal(a.as_record(), b.as_record())
        np.testing.assert_array_equal(a.replicates, b.replicates)
    np.testing.assert_equal(curve_fresh, curve_memo)  # nan == nan here
    hits = ORACLE_MEMO.hits
    score_method(full, removed + 1e-3, delta_b, n_boot=20, seed=1)
    assert ORACLE_MEMO.hits == hits


def test_reproducible_and_shared_replicates(data: Data) -> None:
    full, removed, mu = data
    delta = broadcast(mu, 64) + np.random.default_rng(17).normal(size=removed.shape)
    first = score_method(full, removed, delta, n_boot=10, seed=5, n_workers=1)
    second = score_method(full, removed, delta, n_boot=10, seed=5, n_workers=3)  # threads: same result
    for a, b in zip(first, second, strict=True):
        np.testing.assert_equal(a.as_record(), b.as_record())  # nan == nan here
        np.testing.assert_array_equal(a.replicates, b.replicates)
    other = by_metric(score_method(full, removed, delta, n_boot=10, seed=6))
    assert not np.array_equal(
        by_metric(first)["loo_mean_spearman"].replicates, other["loo_mean_spearman"].replicates
    )
    # replicate indices do not depend on n_splits or on is_distributional
    plan_a = make_resampling_plan(64, 30, 8, n_splits=20, n_boot=5, seed=5)
    plan_b = make_resampling_plan(64, 30, 8, n_splits=3, n_boot=5, seed=5)
    for ra, rb in zip(plan_a.replicates, plan_b.replicates, strict=True):
        np.testing.assert_array_equal(ra.split.half_a, rb.split.half_a)
        np.testing.assert_array_equal(ra.targets, rb.targets)
        np.testing.assert_array_equal(ra.seeds, rb.seeds)
    dist = sc.bootstrap_replicates(full, removed, delta, n_boot=10, seed=5, ci_method="percentile")
    rank = sc.bootstrap_replicates(
        full, removed, delta, n_boot=10, seed=5, ci_method="percentile", is_distributional=False
    )
    assert set(rank) == {"loo_mean_spearman", "loo_seed_spearman"}
    np.testing.assert_array_equal(dist["loo_mean_spearman"], rank["loo_mean_spearman"])
    np.testing.assert_array_equal(dist["loo_seed_spearman"], rank["loo_seed_spearman"])


def test_ranking_only_method_reports_two_scores(data: Data) -> None:
    full, removed, mu = data
    scores_only = 10.0 * broadcast(mu, 64) - 3.0  # rank-preserving transform: Spearman unchanged
    results = score_method(full, removed, scores_only, is_distributional=False, n_boot=N_BOOT, seed=3)
    assert [r.metric for r in results] == ["loo_mean_spearman", "loo_seed_spearman"]
    ranked = by_metric(results)
    full_results = by_metric(score_method(full, removed, broadcast(mu, 64), n_boot=N_BOOT, seed=3))
    for metric in ranked:
        assert ranked[metric].value == pytest.approx(full_results[metric].value, abs=1e-12)
        assert ranked[metric].noise_ceiling == pytest.approx(full_results[metric].noise_ceiling, abs=1e-12)


def test_input_validation() -> None:
    full, removed, mu = make_data(n_seeds=6, n_targets=4, n_queries=3)
    delta = broadcast(mu, 6)
    with pytest.raises(ValueError, match=r"at least 4 seeds.*full \(3, 3\)"):
        score_method(full[:3], removed[:3], delta[:3])
    with pytest.raises(ValueError, match=r"`removed` must have shape \[S, K, Q\]"):
        score_method(full, removed[:, :, :2], delta[:, :, :2])
    with pytest.raises(ValueError, match="`delta` must have the shape"):
        score_method(full, removed, delta[:, :3])
    with pytest.raises(ValueError, match=r"`full` must have shape \[S, Q\]"):
        score_method(full[:, 0], removed, delta)
    with pytest.raises(ValueError, match="2 removal targets"):
        score_method(full, removed[:, :1], delta[:, :1])
    bad = delta.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`delta` contains non-finite"):
        score_method(full, removed, bad)


# ----------------------------------------------------------------------------------------------
# Score vs number of seeds
# ----------------------------------------------------------------------------------------------


def test_score_vs_seeds() -> None:
    full, removed, mu = make_data(noise=2.0, seed=18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n = 2 (one seed per half) must not spam warnings
        rows = score_vs_seeds(full, removed, broadcast(mu, 64), True, n_subsets=6, seed=0)
    counts = [2, 4, 8, 16, 32, 64]
    metrics = SCORE_NAMES_DISTRIBUTIONAL + SCORE_NAMES_FIXED_SEED
    assert len(rows) == len(counts) * len(metrics)
    assert {(r["n_seeds"], r["metric"]) for r in rows} == {(n, m) for n in counts for m in metrics}
    table = {(r["n_seeds"], r["metric"]): r for r in rows}
    for key in ("value_mean", "value_se", "ceiling_mean", "ceiling_se"):
        assert key in rows[0]
    ceiling = [table[(n, "loo_mean_spearman")]["ceiling_mean"] for n in counts]
    assert stats.spearmanr(counts, ceiling).statistic > 0.8
    assert ceiling[-1] > ceiling[0] + 0.2
    assert math.isnan(table[(2, "var_influence_spearman")]["value_mean"])
    assert math.isnan(table[(2, "w2_influence_spearman")]["ceiling_mean"])
    assert math.isfinite(table[(4, "var_influence_spearman")]["ceiling_mean"])
    assert table[(64, "loo_seed_spearman")]["ceiling_mean"] == 1.0
    assert table[(64, "loo_seed_spearman")]["value_se"] == 0.0  # full set: no subset variability
    # odd S and explicit counts; ranking-only methods get two metrics
    rows_odd = score_vs_seeds(
        full[:11], removed[:11], broadcast(mu, 11), False, seed_counts=[3, 11], n_subsets=3
    )
    assert {(r["n_seeds"], r["metric"]) for r in rows_odd} == {
        (n, m) for n in (3, 11) for m in ("loo_mean_spearman", "loo_seed_spearman")
    }
    with pytest.raises(ValueError, match="seed_counts"):
        score_vs_seeds(full, removed, broadcast(mu, 64), True, seed_counts=[1, 4])
