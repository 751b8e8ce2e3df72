"""DPM-Solver++ 2M as VibeVoice uses it (spec §3.6), and the CFG latent sampler of one frame (spec §6.5).

Equals diffusers' `DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")`
with all other settings default: midpoint second order, first order on the first and the last step, final sigma 0.
Everything here is float32 (σ₀ ≈ 2e4, so σ² overflows fp16); the initial noise is an argument.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .diffusion_head import DiffusionHead
from .errors import UserError

# diffusers' name of the cosine schedule, as transformers' generation config spells it.
_BETA_ALIASES = {"cosine": "cosine", "squaredcos_cap_v2": "cosine"}


@dataclass(frozen=True)
class SchedulerConfig:
    """The checkpoint's own scheduler fields (diffusion_head_config); only VibeVoice's values are supported."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "cosine"
    prediction_type: str = "v_prediction"

    def __post_init__(self):
        if self.beta_schedule not in _BETA_ALIASES:
            raise UserError(f"Unsupported ddpm_beta_schedule {self.beta_schedule!r} in config.json: VibeVoice "
                            "uses 'cosine'.")
        if self.prediction_type != "v_prediction":
            raise UserError(f"Unsupported prediction_type {self.prediction_type!r} in config.json: VibeVoice "
                            "uses 'v_prediction'.")
        if int(self.num_train_timesteps) < 2:
            raise UserError(f"ddpm_num_steps {self.num_train_timesteps} in config.json must be at least 2.")

    @classmethod
    def from_head_config(cls, head: Dict[str, Any]) -> "SchedulerConfig":
        return cls(int(head.get("ddpm_num_steps", 1000)), head.get("ddpm_beta_schedule", "cosine"),
                   head.get("prediction_type", "v_prediction"))


@dataclass(frozen=True)
class _Step:
    """Float32 scalars of one solver step from σ_i to σ_{i+1}, in diffusers' order of operations."""

    order: int  # 0 marks the last step (σ_{i+1} = 0): the result is x0 itself
    alpha: float  # α_i: x0 = α_i x - s_i v
    sigma: float  # s_i
    ratio: float  # s_{i+1} / s_i
    phi: float  # α_{i+1} (e^{-h} - 1)
    inv_r: float  # h / h0, second order only


@dataclass(frozen=True)
class Schedule:
    """The solver for one step count: its timesteps and per-step constants. A value: build it once with
    `DPMSolver.schedule(n)` and pass it; the history (previous x0) lives in the caller's loop, so every frame
    starts fresh, as `set_timesteps` does in the reference."""

    timesteps: Tuple[int, ...]
    plan: Tuple[_Step, ...]

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, v: mx.array, x: mx.array, i: int, prev_x0: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
        """Step i: model output v at x (both float32) -> (next x, this step's x0 for the next call)."""
        c = self.plan[i]
        if c.order == 2 and prev_x0 is None:
            raise ValueError(f"step {i} of {len(self)} is second order and needs the previous step's x0")
        return solver_step(v, x, prev_x0, (c.alpha, c.sigma, c.ratio, c.phi, c.inv_r))

    def coefficients(self) -> mx.array:
        """float32 [n, 5]: each step's (alpha, sigma, ratio, phi, inv_r), the input of `solver_step`."""
        return mx.array(np.array([(c.alpha, c.sigma, c.ratio, c.phi, c.inv_r) for c in self.plan], np.float32))


def solver_step(v: mx.array, x: mx.array, prev_x0: Optional[mx.array], coefficients) -> Tuple[mx.array, mx.array]:
    """One DPM-Solver++ 2M step -> (next x, x0), with the step's constants (`Schedule.coefficients`, a row or a
    tuple) as values, so one traced step serves every step of every step count. The orders need no branch: a
    first-order step has inv_r = 0 (its history term vanishes), the last one ratio = 0 and phi = -1 (it gives x0).
    """
    alpha, sigma, ratio, phi, inv_r = (coefficients[k] for k in range(5))
    x0 = alpha * x - sigma * v
    if prev_x0 is None:  # first order: no history term
        return ratio * x - phi * x0, x0
    d1 = inv_r * (x0 - prev_x0)
    return ratio * x - phi * x0 - (0.5 * phi) * d1, x0


class DPMSolver:
    """Deterministic multistep DPM-Solver++ (order 2, midpoint) with the cosine schedule and v-prediction."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "cosine",
                 prediction_type: str = "v_prediction"):
        SchedulerConfig(num_train_timesteps, beta_schedule, prediction_type)  # validates
        self.num_train_timesteps = num_train_timesteps

        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], np.float32)
        # The reference's fp32 cumprod accumulates in double on the CPU; doing the same gives its table bit for bit.
        alphas_cumprod = np.cumprod((1 - betas).astype(np.float64)).astype(np.float32)
        self.train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32 [T]

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> "DPMSolver":
        return cls(config.num_train_timesteps, config.beta_schedule, config.prediction_type)

    def timesteps(self, n: int) -> List[int]:
        """The n timesteps, high to low: round(linspace(0, T-1, n+1)) reversed, without the final 0."""
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {n}")
        return [int(t) for t in np.linspace(0, self.num_train_timesteps - 1, n + 1).round()[::-1][:-1]]

    def sigmas(self, n: int) -> np.ndarray:
        """float32 [n+1]: σ of each timestep (interpolated in the training table), then a final 0."""
        t = np.array(self.timesteps(n), dtype=np.float64)
        s = np.interp(t, np.arange(self.num_train_timesteps), self.train_sigmas)
        return np.concatenate([s, [0.0]]).astype(np.float32)

    def orders(self, n: int) -> List[int]:
        """Solver order of each step: 1 on the first (no history) and the last (σ = 0), else 2."""
        return [1 if i == 0 or i == n - 1 else 2 for i in range(n)]

    def schedule(self, n: int) -> Schedule:
        """The timesteps and float32 step constants of an n-step run."""
        f32 = np.float32
        sig = self.sigmas(n)
        alpha = (f32(1) / np.sqrt(sig * sig + f32(1))).astype(f32)
        s = (sig * alpha).astype(f32)
        with np.errstate(divide="ignore"):  # λ of the final σ = 0 is +inf and never used
            lam = (np.log(alpha) - np.log(s)).astype(f32)
        plan = []
        for i, order in enumerate(self.orders(n)):
            if i == n - 1:
                plan.append(_Step(0, float(alpha[i]), float(s[i]), 0.0, -1.0, 0.0))
                continue
            h = f32(lam[i + 1] - lam[i])
            phi = f32(alpha[i + 1] * (np.exp(-h) - f32(1)))
            inv_r = float(f32(1) / f32(f32(lam[i] - lam[i - 1]) / h)) if order == 2 else 0.0
            plan.append(_Step(order, float(alpha[i]), float(s[i]), float(f32(s[i + 1] / s[i])), float(phi), inv_r))
        return Schedule(tuple(self.timesteps(n)), tuple(plan))


def guided_step(head: DiffusionHead, x: mx.array, prev_x0: mx.array, modulations: List[mx.array], coefficients,
                cfg_scale) -> Tuple[mx.array, mx.array]:
    """One step of `sample_latent` -> (next x, x0): the head on both CFG branches of x [N, latent] (from their
    precomputed modulations, [N, 2, kH] each), the guidance and the solver step. `cfg_scale` and the step's
    `coefficients` are values, not constants of a trace. `prev_x0` of the first step may be anything finite."""
    v2 = head.predict(mx.stack([x, x], axis=1), modulations).astype(mx.float32)
    v = v2[:, 1] + cfg_scale * (v2[:, 0] - v2[:, 1])
    return solver_step(v, x, prev_x0, coefficients)


def sample_latent(head: DiffusionHead, pos_cond: mx.array, neg_cond: mx.array, noise: mx.array,
                  schedule: Schedule, cfg_scale, fast: bool = True, t_embeddings: Optional[mx.array] = None,
                  step: Optional[Callable] = None) -> mx.array:
    """Denoise one latent frame with classifier-free guidance (architecture.md §6.5).

    pos_cond / neg_cond [N, H]: LM hidden states of the positive and negative branch; noise [N, latent]: the
    initial latent. Each step runs the head once on each script's two rows ([x; x] under [pos; neg], side by side)
    and integrates v = v_neg + cfg_scale (v_pos - v_neg). Returns the normalized latent z, float32 [N, latent].

    `fast=True` precomputes every step's adaLN modulations in one pass (§9.3-3), so each step runs only the FFNs
    and the final linear; `fast=False` calls the head as the reference does. Both give the same result.
    `t_embeddings` ([n, H], `head.t_embedder(schedule.timesteps)`) may be passed in, computed once per schedule;
    `step(x, prev_x0, modulations, coefficients, cfg_scale)` (default: `guided_step` of `head`) may be compiled
    (the engine's frame step does): one trace then serves every step count and guidance scale.
    """
    n = pos_cond.shape[0]
    cond = mx.stack([pos_cond, neg_cond], axis=1)  # [N, 2, H]: a script's branches side by side
    x = noise.astype(mx.float32)
    if fast:
        t_emb = head.t_embedder(schedule.timesteps) if t_embeddings is None else t_embeddings
        mods = head.modulations(cond, t_emb)
        coefficients = schedule.coefficients()
        step = step or partial(guided_step, head)
        x0 = x
        for i in range(len(schedule)):
            x, x0 = step(x, x0, [m[:, i] for m in mods], coefficients[i], cfg_scale)
        return x
    x0 = None
    for i, t in enumerate(schedule.timesteps):
        x2 = mx.stack([x, x], axis=1).reshape(2 * n, -1)
        v2 = head(x2, mx.full((2 * n,), t, dtype=mx.float32), cond.reshape(2 * n, -1))
        v2 = v2.astype(mx.float32).reshape(n, 2, -1)
        v = v2[:, 1] + cfg_scale * (v2[:, 0] - v2[:, 1])
        x, x0 = schedule.step(v, x, i, x0)
    return x
