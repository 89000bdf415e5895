"""Behaviour of a simulated IBL session: biased-choice-world trials, wheel encoder, camera motion energy.

Everything here follows IBL's published task structure (see ``shared/IBL-DATA.md``): 90 unbiased trials then
alternating 0.2/0.8 blocks, contrasts {1, .25, .125, .0625, 0} with 0 % half as often, a psychometric choice
biased by the block, contrast-dependent reaction times, a minimum-jerk wheel turn that brings the stimulus to
the centre, and a whisking process seen by a 60 Hz left and a 150 Hz right camera.

Sign convention (IBL): ``choice = +1`` is a clockwise turn, correct for a left stimulus; the wheel position
counts counter-clockwise as positive, so a ``choice = +1`` turn makes the wheel position *decrease*.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Final

import numba
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CONTRASTS: Final = (1.0, 0.25, 0.125, 0.0625, 0.0)
_CONTRAST_P: Final = np.array([2.0, 2.0, 2.0, 2.0, 1.0]) / 9.0  # 0 % half as often as each other contrast
N_UNBIASED: Final = 90  # first trials at pLeft 0.5
BLOCK_SCALE: Final = 60.0  # truncated exponential block lengths
BLOCK_MIN, BLOCK_MAX = 20, 100
WHEEL_TICKS_PER_TURN: Final = 4096
WHEEL_RESOLUTION: Final = 2 * np.pi / WHEEL_TICKS_PER_TURN  # radians per encoder count
RESPONSE_THRESHOLD_RAD: Final = 35.0 / 4.0 / 31.0  # 35 visual deg at 4 deg/mm on a 31 mm radius wheel (~0.28)
WHEEL_FS: Final = 1000.0  # Hz, the continuous wheel trace before encoding
FINE_STEP: Final = 0.005  # s, the latent / rate grid shared with the neurons
_SUB: Final = round(FINE_STEP * WHEEL_FS)  # wheel samples per fine step
CAMERA_FS: Final = {"left": 60.0, "right": 150.0}
REWARD_UL: Final = 1.5
SPEED_SCALE: Final = 3.0  # rad/s, typical peak speed of a response turn (latent = speed / SPEED_SCALE)


@dataclass
class TaskParams:
    """Per-session psychometric and motor parameters of the simulated mouse."""

    sigma: float  # psychometric slope (contrast units)
    prior_bias: float  # contrast-equivalent shift towards the likely side in a 0.2/0.8 block
    lapse: float  # lapse rate on each side
    rt_median: float  # s, median reaction time at full contrast (above the 80 ms floor)
    rt_low_contrast: float  # s, extra median reaction time at 0 % contrast

    @classmethod
    def draw(cls, rng: np.random.Generator) -> TaskParams:
        return cls(
            sigma=float(rng.uniform(0.09, 0.15)),
            prior_bias=float(rng.uniform(0.065, 0.095)),
            lapse=float(rng.uniform(0.04, 0.12)),
            rt_median=float(rng.uniform(0.12, 0.22)),
            rt_low_contrast=float(rng.uniform(0.2, 0.4)),
        )


@dataclass
class Behaviour:
    """One simulated session's behaviour, plus the continuous signals the neurons see on the fine grid."""

    trials: pd.DataFrame  # (K trials) the IBL trials table
    duration: float  # s, session length; every time lies in [0, duration)
    wheel_times: np.ndarray  # (E,) float64 s, one per encoder count change (irregular)
    wheel_position: np.ndarray  # (E,) float64 radians, counter-clockwise positive, quantised to counts
    speed: np.ndarray  # (G,) float64 rad/s, mean absolute wheel velocity per fine step
    whisk: np.ndarray  # (G,) float64 whisking latent per fine step (standardised: mean 0, sd 1)
    prior: np.ndarray  # (K,) float64 the mouse's running estimate of pLeft, per trial
    step: float = FINE_STEP  # s, fine-grid step; step g covers [g * step, (g + 1) * step)

    @property
    def n_steps(self) -> int:
        return int(self.speed.shape[0])


# ---------------------------------------------------------------------------------------------- trials
def draw_blocks(rng: np.random.Generator, n_trials: int) -> np.ndarray:
    """(K,) probabilityLeft: 90 trials at 0.5, then 0.2/0.8 alternating, lengths ~ Exp(60) in [20, 100]."""
    p_left = np.full(n_trials, 0.5)
    side = 0.2 if rng.random() < 0.5 else 0.8
    i = N_UNBIASED
    while i < n_trials:
        length = 0
        while not BLOCK_MIN <= length <= BLOCK_MAX:
            length = round(rng.exponential(BLOCK_SCALE))
        p_left[i : i + length] = side
        side = 0.2 if side == 0.8 else 0.8  # exact values: loaders map 0.2/0.5/0.8 to classes
        i += length
    return p_left


def _min_jerk(tau: np.ndarray) -> np.ndarray:
    """Minimum-jerk profile s(tau) in [0, 1] for tau in [0, 1]."""
    tau = np.clip(tau, 0.0, 1.0)
    return tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)


def _min_jerk_inverse(level: np.ndarray) -> np.ndarray:
    """tau with s(tau) = level (bisection, vectorised; level in (0, 1))."""
    lo, hi = np.zeros_like(level), np.ones_like(level)
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        below = _min_jerk(mid) < level
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))), dtype=np.float64)


def _contrast_response(c: np.ndarray) -> np.ndarray:
    """Naka-Rushton contrast response in [0, 1) (0 at 0 % contrast, ~0.95 at 100 %)."""
    c = np.nan_to_num(c)
    return c**1.5 / (c**1.5 + 0.15**1.5) * 1.06


def draw_trials(
    rng: np.random.Generator, n_trials: int, params: TaskParams, t_first: float
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """The trials table (K rows), and per trial: response-turn amplitude (rad) and duration (s), and the
    mouse's prior estimate of pLeft."""
    k = n_trials
    p_left = draw_blocks(rng, k)
    is_left = rng.random(k) < p_left
    contrast = rng.choice(np.asarray(CONTRASTS), size=k, p=_CONTRAST_P)
    contrast_left = np.where(is_left, contrast, np.nan)  # NaN on the side without a stimulus
    contrast_right = np.where(is_left, np.nan, contrast)
    signed = np.where(is_left, contrast, -contrast)  # > 0: stimulus on the left

    # the mouse's prior tracks the block with a lag of a few trials
    prior = np.empty(k)
    est = 0.5
    for i in range(k):
        prior[i] = est
        est += 0.2 * (p_left[i] - est)
    shift = params.prior_bias * (prior - 0.5) / 0.3
    p_cw = params.lapse + (1.0 - 2.0 * params.lapse) * _normal_cdf((signed + shift) / params.sigma)
    choice = np.where(rng.random(k) < p_cw, 1.0, -1.0)  # +1 clockwise: correct for a left stimulus
    correct = (choice > 0) == is_left
    feedback_type = np.where(correct, 1.0, -1.0)

    strength = _contrast_response(contrast)
    rt_med = params.rt_median + params.rt_low_contrast * (1.0 - strength)
    rt = 0.08 + rt_med * np.exp(0.55 * rng.standard_normal(k))  # s, stimOn -> first movement
    rt = np.where(rt > 2.0, np.where(rng.random(k) < 0.6, rng.uniform(0.3, 2.0, k), rt), rt)
    rt = np.minimum(rt, 8.0)  # rare long tail kept; NEDS' loaders drop those trials
    amplitude = rng.uniform(0.33, 0.6, k)  # rad, overshoots the 0.28 rad threshold
    move_dur = np.clip(0.28 * np.exp(0.3 * rng.standard_normal(k)) * (1.2 - 0.3 * strength), 0.12, 0.8)
    t_cross = move_dur * _min_jerk_inverse(RESPONSE_THRESHOLD_RAD / amplitude)

    quiescence = rng.uniform(0.4, 0.7, k)
    restarts = rng.exponential(0.8, k)  # quiescence restarts after small wiggles
    go_jitter = rng.uniform(-0.002, 0.012, k)
    fb_delay = rng.uniform(0.0005, 0.004, k)
    iti = rng.uniform(0.95, 1.1, k)
    gap = rng.uniform(0.01, 0.08, k)

    cols = {
        n: np.empty(k)
        for n in (
            "intervals_0",
            "intervals_1",
            "stimOn_times",
            "goCue_times",
            "response_times",
            "firstMovement_times",
            "feedback_times",
        )
    }
    t = t_first
    for i in range(k):
        stim_on = t + quiescence[i] + restarts[i]
        first_move = stim_on + rt[i]
        response = first_move + t_cross[i]
        feedback = response + fb_delay[i]
        end = feedback + (1.0 if correct[i] else 2.0) + iti[i]
        cols["intervals_0"][i] = t
        cols["stimOn_times"][i] = stim_on
        cols["goCue_times"][i] = stim_on + go_jitter[i]
        cols["firstMovement_times"][i] = first_move
        cols["response_times"][i] = response
        cols["feedback_times"][i] = feedback
        cols["intervals_1"][i] = end
        t = end + gap[i]
    trials = pd.DataFrame(
        {
            "intervals_0": cols["intervals_0"],
            "intervals_1": cols["intervals_1"],
            "stimOn_times": cols["stimOn_times"],
            "goCue_times": cols["goCue_times"],
            "response_times": cols["response_times"],
            "firstMovement_times": cols["firstMovement_times"],
            "feedback_times": cols["feedback_times"],
            "choice": choice,
            "feedbackType": feedback_type,
            "contrastLeft": contrast_left,
            "contrastRight": contrast_right,
            "probabilityLeft": p_left,
            "rewardVolume": np.where(correct, REWARD_UL, 0.0),
        }
    )
    return trials, amplitude, move_dur, prior


# ----------------------------------------------------------------------------------------------- wheel
def _add_movement(delta: np.ndarray, t_start: float, amplitude: float, duration: float) -> None:
    """Add a minimum-jerk turn of ``amplitude`` rad to the per-sample position increments ``delta``."""
    i0 = int(np.ceil(t_start * WHEEL_FS))
    n = int(np.ceil(duration * WHEEL_FS)) + 1
    i1 = min(i0 + n, delta.shape[0])
    if i0 >= i1:
        return
    x = amplitude * _min_jerk((np.arange(i0, i1) / WHEEL_FS - t_start) / duration)  # (n,) rad
    delta[i0:i1] += np.diff(x, prepend=0.0)


def wheel_trace(
    rng: np.random.Generator,
    trials: pd.DataFrame,
    amplitude: np.ndarray,
    move_dur: np.ndarray,
    n_samples: int,
) -> np.ndarray:
    """(M,) float64 continuous wheel position (rad, CCW positive) at WHEEL_FS, starting at 0."""
    delta = np.zeros(n_samples)  # (M,) position increments per 1 kHz sample
    choice = trials["choice"].to_numpy()
    first_move = trials["firstMovement_times"].to_numpy()
    feedback = trials["feedback_times"].to_numpy()
    next_quiet = np.append(trials["intervals_0"].to_numpy()[1:], np.inf)  # no movement after the next start
    for i in range(len(trials)):
        _add_movement(delta, first_move[i], -choice[i] * amplitude[i], move_dur[i])  # CW (choice +1) -> down
        # small movements after feedback (licking, repositioning), inside this trial's ITI
        free_from = feedback[i] + move_dur[i] + 0.1
        n_wiggles = rng.poisson(0.8)
        for _ in range(n_wiggles):
            dur = rng.uniform(0.15, 0.4)
            start = free_from + rng.uniform(0.0, 1.0)
            if start + dur < next_quiet[i]:
                _add_movement(delta, start, rng.normal(0.0, 0.06), dur)
    return np.cumsum(delta)


def encode_wheel(trace: np.ndarray, fs: float = WHEEL_FS) -> tuple[np.ndarray, np.ndarray]:
    """Rotary-encoder output of a continuous trace: (E,) times s and (E,) positions rad, one per count change.

    The first sample is the start position at t = 0; each later sample is the moment the trace crossed the
    half-count level between two counts (linear within a 1 ms sample), so timestamps are irregular and
    strictly increasing.
    """
    counts = np.round(trace / WHEEL_RESOLUTION).astype(np.int64)  # (M,) encoder counts
    dc = np.diff(counts)
    idx = np.flatnonzero(dc)
    n_each = np.abs(dc[idx])
    rep = np.repeat(idx, n_each)  # (E-1,) sample index before each crossing
    sign = np.sign(dc[rep])
    within = np.arange(rep.size) - np.repeat(np.cumsum(n_each) - n_each, n_each)  # 0.. within a jump
    new_count = counts[rep] + sign * (within + 1)
    level = (new_count - 0.5 * sign) * WHEEL_RESOLUTION  # half-count boundary crossed
    x0, x1 = trace[rep], trace[rep + 1]
    frac = np.clip((level - x0) / (x1 - x0), 1e-6, 1.0)
    times = np.concatenate([[0.0], (rep + frac) / fs])
    position = np.concatenate([[counts[0]], new_count]) * WHEEL_RESOLUTION
    return times, position


def _fine_speed(trace: np.ndarray, n_steps: int) -> np.ndarray:
    """(G,) mean |velocity| in rad/s per fine step from the 1 kHz trace."""
    vel = np.abs(np.diff(trace, prepend=trace[0])) * WHEEL_FS  # (M,) rad/s
    return vel[: n_steps * _SUB].reshape(n_steps, _SUB).mean(axis=1)


# -------------------------------------------------------------------------------------------- whisking
@numba.njit(cache=True)
def _ar1(x: np.ndarray, a: float, gain: float) -> np.ndarray:
    """y[i] = a * y[i-1] + gain * x[i], y[0] = x[0] (first-order recursive filter)."""
    y = np.empty_like(x)
    acc = x[0] if x.shape[0] else 0.0
    for i in range(x.shape[0]):
        acc = a * acc + gain * x[i] if i else x[0]
        y[i] = acc
    return y


def ou_process(rng: np.random.Generator, n: int, tau: float, step: float) -> np.ndarray:
    """(n,) unit-variance Ornstein-Uhlenbeck process with time constant ``tau`` sampled every ``step``."""
    a = float(np.exp(-step / tau))
    noise = rng.standard_normal(n)  # first value is the stationary start, N(0, 1)
    return _ar1(noise, a, float(np.sqrt(1.0 - a * a)))


def lowpass(x: np.ndarray, tau: float, step: float) -> np.ndarray:
    """(n,) causal exponential smoothing of ``x`` with time constant ``tau`` (unit DC gain)."""
    a = float(np.exp(-step / tau))
    return _ar1(np.ascontiguousarray(x, dtype=np.float64), a, 1.0 - a)


def whisking(rng: np.random.Generator, trials: pd.DataFrame, speed: np.ndarray, step: float) -> np.ndarray:
    """(G,) standardised whisking latent: spontaneous bouts + movement-locked + reward (licking) bouts."""
    n = speed.shape[0]
    move = lowpass(speed / SPEED_SCALE, 0.25, step)
    reward = np.zeros(n)
    fb = trials["feedback_times"].to_numpy()
    for t in fb[trials["feedbackType"].to_numpy() > 0]:
        i0, i1 = int(t / step), min(int((t + rng.uniform(0.8, 1.8)) / step), n)
        reward[i0:i1] += 1.0
    raw = (
        0.7 * ou_process(rng, n, 0.8, step)
        + 0.35 * ou_process(rng, n, 6.0, step)
        + 1.6 * move
        + 0.6 * lowpass(reward, 0.15, step)
    )
    return (raw - raw.mean()) / max(float(raw.std()), 1e-9)


def camera_motion_energy(
    rng: np.random.Generator, whisk: np.ndarray, step: float, duration: float, camera: str
) -> tuple[np.ndarray, np.ndarray]:
    """(F,) frame times s and (F,) ROI motion energy (0-255 scale) of one camera from the whisking latent."""
    fs = CAMERA_FS[camera]
    offset = rng.uniform(0.0, 1.0 / fs)
    n = int((duration - offset) * fs)
    times = offset + np.arange(n) / fs * (1.0 + rng.normal(0.0, 2e-5)) + rng.normal(0.0, 1e-4, n)
    times = np.maximum.accumulate(np.clip(times, 0.0, duration - 1e-6))
    g = np.minimum((times / step).astype(np.int64), whisk.shape[0] - 1)
    base, gain = (1.1, 1.4) if camera == "left" else (0.8, 1.1)
    drive = np.logaddexp(0.0, 1.3 * whisk[g])  # softplus: whisking only adds motion
    me = base + gain * drive * np.exp(0.3 * rng.standard_normal(n)) + np.abs(rng.normal(0.0, 0.3, n))
    return times, me.astype(np.float32)


# ----------------------------------------------------------------------------------------------- session
def simulate_behaviour(
    rng: np.random.Generator, n_trials: int
) -> tuple[Behaviour, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Trials, wheel, fine-grid speed and whisking, and camera motion energy of one session."""
    params = TaskParams.draw(rng)
    trials, amplitude, move_dur, prior = draw_trials(rng, n_trials, params, t_first=float(rng.uniform(5, 20)))
    duration = float(trials["intervals_1"].iloc[-1]) + float(rng.uniform(3.0, 10.0))
    n_steps = int(np.ceil(duration / FINE_STEP))
    duration = n_steps * FINE_STEP  # the fine grid tiles the session exactly
    trace = wheel_trace(rng, trials, amplitude, move_dur, n_steps * _SUB)
    wheel_times, wheel_position = encode_wheel(trace)
    speed = _fine_speed(trace, n_steps)
    whisk = whisking(rng, trials, speed, FINE_STEP)
    cameras = {cam: camera_motion_energy(rng, whisk, FINE_STEP, duration, cam) for cam in ("left", "right")}
    beh = Behaviour(
        trials=trials,
        duration=duration,
        wheel_times=wheel_times,
        wheel_position=wheel_position,
        speed=speed,
        whisk=whisk,
        prior=prior,
    )
    log.debug("behaviour: %d trials, %.0f s, %d wheel samples", n_trials, duration, wheel_times.size)
    return beh, cameras
