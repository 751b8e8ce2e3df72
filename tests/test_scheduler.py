"""DPM-Solver++ 2M against the tables and formulas written in architecture.md §3.6 (no reference code involved)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from vibevoice_mlx.diffusion_head import DiffusionHead, DiffusionHeadConfig
from vibevoice_mlx.scheduler import DPMSolver, sample_latent

# architecture.md §3.6, "Tables ([EXP], for unit tests)".
SPEC = {
    5: ([999, 799, 599, 400, 200], [20291.30, 3.10373, 1.390751, 0.740281, 0.337461, 0.0], [1, 2, 2, 2, 1]),
    10: ([999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
         [20291.30, 6.364592, 3.10373, 1.980698, 1.390751, 1.015551, 0.740281, 0.52236, 0.337461, 0.171044, 0.0],
         [1] + [2] * 8 + [1]),
}


@pytest.mark.parametrize("n", [5, 10])
def test_tables_match_spec(n):
    solver = DPMSolver(num_train_timesteps=1000, beta_schedule="cosine", prediction_type="v_prediction")
    timesteps, sigmas, orders = SPEC[n]
    assert solver.timesteps(n) == timesteps
    got = solver.sigmas(n)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, sigmas, rtol=1e-5, atol=0)
    assert solver.orders(n) == orders


def test_tables_match_spec_20_steps():
    solver = DPMSolver()
    t = solver.timesteps(20)
    # "999, 949, …, 100, 50 (step ≈ 50; 500 and 450 included)"
    assert len(t) == 20 and t[:2] == [999, 949] and t[-2:] == [100, 50] and 500 in t and 450 in t
    assert all(45 <= a - b <= 55 for a, b in zip(t, t[1:]))
    s = solver.sigmas(20)
    assert len(s) == 21
    np.testing.assert_allclose(s[:5], [20291.30, 12.807271, 6.364592, 4.199538, 3.10373], rtol=1e-5)
    np.testing.assert_allclose(s[-3:], [0.171044, 0.091348, 0.0], rtol=1e-5)
    assert solver.orders(20) == [1] + [2] * 18 + [1]


def test_schedule_constants():
    # β₀ = 4.13e-5, β₉₉₉ clamped to 0.999, ᾱ₉₉₉ = 2.43e-9: σ = sqrt((1 - ᾱ) / ᾱ).
    sig = DPMSolver().train_sigmas
    assert sig.dtype == np.float32 and sig.shape == (1000,)
    np.testing.assert_allclose(sig[0], math.sqrt(4.13e-5 / (1 - 4.13e-5)), rtol=2e-3)
    np.testing.assert_allclose(sig[999], math.sqrt((1 - 2.43e-9) / 2.43e-9), rtol=2e-3)


def _spec_trajectory(sigmas, x, vs):
    """§3.6 step formulas in float64 NumPy, written from the spec text."""
    n = len(vs)
    alpha = 1 / np.sqrt(sigmas[:n] ** 2 + 1)
    s = sigmas[:n] * alpha
    lam = np.log(alpha) - np.log(s)
    out, prev = [], None
    for i in range(n):
        x0 = alpha[i] * x - s[i] * vs[i]
        if i == n - 1:
            x = x0
        else:
            a1 = 1 / math.sqrt(sigmas[i + 1] ** 2 + 1)
            s1, l1 = sigmas[i + 1] * a1, math.log(a1) - math.log(sigmas[i + 1] * a1)
            h = l1 - lam[i]
            x_new = (s1 / s[i]) * x - a1 * (math.exp(-h) - 1) * x0
            if i > 0:
                r = (lam[i] - lam[i - 1]) / h
                x_new -= 0.5 * a1 * (math.exp(-h) - 1) * (x0 - prev) / r
            x = x_new
        prev = x0
        out.append(x)
    return out


@pytest.mark.parametrize("n", [5, 10, 20])
def test_trajectory_follows_spec_formulas(n):
    solver = DPMSolver()
    rng = np.random.default_rng(n)
    x_init = rng.standard_normal((2, 16)).astype(np.float32)
    vs = [rng.standard_normal((2, 16)).astype(np.float32) for _ in range(n)]
    want = _spec_trajectory(solver.sigmas(n).astype(np.float64), x_init.astype(np.float64), vs)
    x, x0 = mx.array(x_init), None
    schedule = solver.schedule(n)
    for i in range(n):
        x, x0 = schedule.step(mx.array(vs[i]), x, i, x0)
        assert x.dtype == mx.float32
        scale = np.abs(want[i]).max()
        np.testing.assert_allclose(np.array(x), want[i], rtol=0, atol=1e-5 * scale, err_msg=f"step {i}")


def test_last_step_returns_x0_exactly():
    solver = DPMSolver()
    n = 10
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((1, 8)).astype(np.float32))
    v = mx.array(rng.standard_normal((1, 8)).astype(np.float32))
    prev = mx.array(rng.standard_normal((1, 8)).astype(np.float32))
    x_next, x0 = solver.schedule(n).step(v, x, n - 1, prev)
    assert np.array_equal(np.array(x_next), np.array(x0))
    sigma = float(SPEC[10][1][n - 1])
    alpha = 1 / math.sqrt(sigma**2 + 1)
    np.testing.assert_allclose(np.array(x0), alpha * np.array(x) - sigma * alpha * np.array(v), rtol=1e-5, atol=1e-6)


def test_second_order_step_needs_history():
    with pytest.raises(ValueError, match="previous step"):
        DPMSolver().schedule(10).step(mx.zeros((1, 4)), mx.zeros((1, 4)), 1, None)


def test_state_is_reset_per_call():
    cfg = DiffusionHeadConfig(hidden_size=32, latent_size=4, head_layers=2)
    mx.random.seed(0)
    head = DiffusionHead(cfg)
    rng = np.random.default_rng(2)
    pos, neg = (mx.array(rng.standard_normal((1, 32)).astype(np.float32)) for _ in range(2))
    noise = mx.array(rng.standard_normal((1, 4)).astype(np.float32))
    shared = DPMSolver()
    first = np.array(sample_latent(head, pos, neg, noise, shared.schedule(10), 1.3))
    sample_latent(head, neg, pos, noise * 3, shared.schedule(5), 1.3)  # another frame with another step count
    again = np.array(sample_latent(head, pos, neg, noise, shared.schedule(10), 1.3))
    fresh = np.array(sample_latent(head, pos, neg, noise, DPMSolver().schedule(10), 1.3))
    assert np.array_equal(first, again) and np.array_equal(first, fresh)
    assert not np.array_equal(first, np.array(sample_latent(head, pos, neg, noise, shared.schedule(5), 1.3)))


def test_rejects_other_schedules():
    with pytest.raises(ValueError):
        DPMSolver(beta_schedule="linear")
    with pytest.raises(ValueError):
        DPMSolver(prediction_type="epsilon")
