"""Simulated neurons: shared latents, probe geometry, units and Poisson spikes (numba).

Each session has one low-dimensional latent trajectory on a fine grid (``sim_task.FINE_STEP``): stimulus
transients, a choice ramp, wheel speed, whisking, the block prior, feedback, and slow private noise. A unit's
rate is ``exp(log_offset + loadings . z(t))`` Hz, piecewise constant on the grid. Loadings are drawn around
region-specific mean tuning vectors fixed by a global constant seed (the same for every session and animal,
so pretraining across sessions helps); ``log_offset`` makes each unit's session-mean rate its base rate.
Spikes are an exact inhomogeneous Poisson process of that rate (time rescaling), so a spike's time is
uniform within its fine step and expected counts are integrals of the rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numba
import numpy as np
import pandas as pd
from scipy.special import ndtri

from streams.sim_task import SPEED_SCALE, Behaviour, _contrast_response, lowpass, ou_process

log = logging.getLogger(__name__)

LATENT_NAMES: Final = (
    "stim_left",
    "stim_right",
    "choice",
    "wheel_speed",
    "whisking",
    "block_prior",
    "feedback",
    "noise_fast",
    "noise_mid",
    "noise_slow",
)
N_LATENTS: Final = len(LATENT_NAMES)
REGIONS: Final = ("VISa", "CA1", "DG", "LP", "PO")  # Beryl acronyms, top of the probe to the tip
# Allen ids per region (fine structures that Beryl maps back to the region; checked in tests with iblatlas)
ALLEN_IDS: Final = {
    "VISa": (312782550, 312782554, 312782558, 312782562, 312782566, 312782570),  # VISa1, 2/3, 4, 5, 6a, 6b
    "CA1": (382,),
    "DG": (10703, 632, 10704),  # DG-mo, DG-sg, DG-po
    "LP": (218,),
    "PO": (1020,),
}
N_CHANNELS: Final = 384
CHANNEL_PITCH_UM: Final = 20.0
TUNING_SEED: Final = 20250504  # fixes the region tuning for every session and animal

# Region tuning: mean and spread of loadings (log-rate per latent unit), columns as LATENT_NAMES
_MEAN_PROFILE: Final = {
    #         stL   stR   cho   spd   whi   blk   fb    nF    nM    nS
    "VISa": (0.45, 0.15, 0.00, 0.08, 0.05, 0.02, 0.05, 0.0, 0.0, 0.0),
    "CA1": (0.02, 0.02, 0.00, 0.12, 0.03, 0.00, 0.10, 0.0, 0.0, 0.0),
    "DG": (0.00, 0.00, 0.00, -0.06, 0.00, 0.05, -0.10, 0.0, 0.0, 0.0),
    "LP": (0.12, 0.08, 0.00, 0.30, 0.15, 0.00, 0.08, 0.0, 0.0, 0.0),
    "PO": (0.05, 0.05, 0.00, 0.25, 0.20, 0.00, 0.10, 0.0, 0.0, 0.0),
}
_SD_PROFILE: Final = {
    "VISa": (0.30, 0.20, 0.03, 0.10, 0.06, 0.04, 0.10, 0.18, 0.18, 0.18),
    "CA1": (0.08, 0.08, 0.06, 0.10, 0.06, 0.10, 0.15, 0.25, 0.25, 0.25),
    "DG": (0.08, 0.08, 0.05, 0.08, 0.05, 0.10, 0.12, 0.28, 0.28, 0.28),
    "LP": (0.15, 0.15, 0.04, 0.20, 0.10, 0.04, 0.12, 0.18, 0.18, 0.18),
    "PO": (0.10, 0.10, 0.04, 0.20, 0.10, 0.04, 0.12, 0.18, 0.18, 0.18),
}

# unit statistics (IBL-DATA.md): log-normal rates, median 4 Hz, mean 7.1 Hz
RATE_MEDIAN_HZ: Final = 4.0
RATE_SIGMA: Final = 1.07
MIN_RATE_HZ: Final = 2.0
N_ABOVE_MIN_MEDIAN: Final = 538
N_ABOVE_MIN_SD: Final = 108
P_GOOD: Final = 0.16  # of all clusters; ~115 good units at the median probe


def region_tuning() -> tuple[np.ndarray, np.ndarray]:
    """(R, L) mean and (R, L) spread of loadings per region (rows as REGIONS), fixed by TUNING_SEED."""
    rng = np.random.default_rng(TUNING_SEED)
    mean = np.array([_MEAN_PROFILE[r] for r in REGIONS])  # (R, L)
    sd = np.array([_SD_PROFILE[r] for r in REGIONS])  # (R, L)
    mean = mean * rng.uniform(0.8, 1.2, mean.shape)  # region idiosyncrasies, the same in every session
    return mean, sd


# ------------------------------------------------------------------------------------------- latents
def _event_kernel(
    n: int, step: float, times: np.ndarray, weights: np.ndarray, latency: float, tau: float, span: float
) -> np.ndarray:
    """(n,) sum of alpha kernels (peak 1 at ``latency + tau``) placed at ``times`` scaled by ``weights``."""
    out = np.zeros(n)
    k = np.arange(int(span / step))
    t = k * step - latency
    kern = np.where(t > 0, (t / tau) * np.exp(1.0 - t / tau), 0.0)  # (S,) alpha kernel, peak 1
    for t0, w in zip(times, weights, strict=True):
        if w == 0 or not np.isfinite(t0):
            continue
        i0 = int(t0 / step)
        i1 = min(i0 + kern.size, n)
        out[i0:i1] += w * kern[: i1 - i0]
    return out


def build_latents(rng: np.random.Generator, beh: Behaviour) -> np.ndarray:
    """(G, L) float32 latents on the fine grid, columns as LATENT_NAMES."""
    n, step, tr = beh.n_steps, beh.step, beh.trials
    z = np.zeros((n, N_LATENTS))  # (G, L) latents per fine step
    stim_on = tr["stimOn_times"].to_numpy()
    first_move = tr["firstMovement_times"].to_numpy()
    feedback = tr["feedback_times"].to_numpy()
    choice = tr["choice"].to_numpy()
    for col, side in ((0, "contrastLeft"), (1, "contrastRight")):
        strength = _contrast_response(tr[side].to_numpy())
        z[:, col] = _event_kernel(n, step, stim_on, strength, 0.04, 0.05, 0.6)
        for t0, t1, w in zip(stim_on, feedback, strength, strict=True):  # weak sustained response
            z[int((t0 + 0.08) / step) : int(t1 / step), col] += 0.25 * w
    for t0, t1, t2, c in zip(stim_on, first_move, feedback, choice, strict=True):
        i0, i1, i2 = int(t0 / step), int(t1 / step), int(t2 / step)
        z[i0:i1, 2] = c * np.linspace(0.0, 1.0, i1 - i0, endpoint=False)  # ramp to the choice's sign
        z[i1:i2, 2] = c
        i3 = min(i2 + int(1.5 / step), n)
        z[i2:i3, 2] = c * np.exp(-np.arange(i3 - i2) * step / 0.4)
    z[:, 3] = beh.speed / SPEED_SCALE
    z[:, 4] = beh.whisk
    starts = np.append(tr["intervals_0"].to_numpy(), beh.duration)
    prior = (beh.prior - 0.5) / 0.3
    for i in range(len(tr)):  # sustained across the trial and its ITI
        z[int(starts[i] / step) : int(starts[i + 1] / step), 5] = prior[i]
    z[:, 6] = _event_kernel(n, step, feedback, tr["feedbackType"].to_numpy(), 0.05, 0.12, 1.2)
    for col, tau in ((7, 0.5), (8, 2.0), (9, 10.0)):
        z[:, col] = ou_process(rng, n, tau, step)
    z[:, 6] = lowpass(z[:, 6], 0.02, step)
    return z.astype(np.float32)


# ----------------------------------------------------------------------------------------------- probe
@dataclass
class ProbeLayout:
    """Channel geometry and anatomy of one Neuropixels 1.0 insertion (384 channels)."""

    allen_ids: np.ndarray  # (C,) int64 Allen id per channel
    regions: np.ndarray  # (C,) str Beryl acronym per channel
    local_coords: np.ndarray  # (C, 2) float64 µm, x across the shank, y up from the tip
    mlapdv: np.ndarray  # (C, 3) int32 µm relative to bregma


def draw_layout(rng: np.random.Generator) -> ProbeLayout:
    """Contiguous region bands along the probe: PO at the tip, then LP, DG, CA1 and VISa at the top."""
    ch = np.arange(N_CHANNELS)
    x = np.array([43.0, 11.0, 59.0, 27.0])[ch % 4]
    y = CHANNEL_PITCH_UM * (ch // 2) + 20.0
    local = np.column_stack([x, y])
    tip_first = REGIONS[::-1]  # PO, LP, DG, CA1, VISa
    frac = np.array([0.2, 0.2, 0.15, 0.15, 0.3]) * np.exp(0.25 * rng.standard_normal(len(tip_first)))
    sizes = np.maximum(np.round(frac / frac.sum() * N_CHANNELS).astype(int), 30)
    sizes[-1] = N_CHANNELS - sizes[:-1].sum()
    regions = np.repeat(np.array(tip_first), sizes)  # (C,) channel 0 is at the tip
    allen = np.empty(N_CHANNELS, dtype=np.int64)
    start = 0
    for name, size in zip(tip_first, sizes, strict=True):
        ids = ALLEN_IDS[name]
        sub = np.minimum((np.arange(size) * len(ids)) // size, len(ids) - 1)  # sub-structures as layers
        allen[start : start + size] = np.asarray(ids)[::-1][sub]  # deepest layer first
        start += size
    # trajectory: entry point near the repeated site, 15 deg off vertical, tip 4 mm deep
    entry = np.array([rng.uniform(-2400, -2100), rng.uniform(-2100, -1900), 0.0])
    direction = np.array([np.sin(np.radians(15)), 0.0, -np.cos(np.radians(15))])
    depth_from_surface = 4000.0 - y  # µm along the shank
    mlapdv = np.round(entry + depth_from_surface[:, None] * direction).astype(np.int32)
    return ProbeLayout(allen_ids=allen, regions=regions, local_coords=local, mlapdv=mlapdv)


# ----------------------------------------------------------------------------------------------- units
@dataclass
class ProbeUnits:
    """The units of one probe and their ground-truth rate model."""

    cluster_ids: np.ndarray  # (N,) int64
    base_rate: np.ndarray  # (N,) float64 Hz, session-mean rate
    label: np.ndarray  # (N,) float64 quality label in {0, 1/3, 2/3, 1}; 1 = good
    channel: np.ndarray  # (N,) int64 channel index
    depth: np.ndarray  # (N,) float64 µm from the tip
    region: np.ndarray  # (N,) str Beryl acronym
    amp: np.ndarray  # (N,) float64 V, median spike amplitude
    loadings: np.ndarray  # (N, L) float32 log-rate per latent unit
    log_offset: np.ndarray  # (N,) float32 so that exp(log_offset + loadings . z) has mean base_rate

    @property
    def n_units(self) -> int:
        return int(self.cluster_ids.shape[0])


def _truncated_lognormal(rng: np.random.Generator, n: int, above: bool) -> np.ndarray:
    """(n,) rates from the unit log-normal, restricted to above (or below) MIN_RATE_HZ (inverse CDF)."""
    from scipy.special import ndtr

    cut = float(ndtr(np.log(MIN_RATE_HZ / RATE_MEDIAN_HZ) / RATE_SIGMA))
    u = rng.uniform(cut, 1.0, n) if above else rng.uniform(0.0, cut, n)
    u = np.clip(u, 1e-12, 1 - 1e-12)
    return np.asarray(RATE_MEDIAN_HZ * np.exp(RATE_SIGMA * ndtri(u)), dtype=np.float64)


def draw_units(rng: np.random.Generator, layout: ProbeLayout, n_above: int | None = None) -> ProbeUnits:
    """Units of one probe: ~538 above 2 Hz (10-90 %: 400-679) plus the same log-normal's sub-2 Hz tail."""
    from scipy.special import ndtr

    if n_above is None:
        n_above = int(np.clip(round(rng.normal(N_ABOVE_MIN_MEDIAN, N_ABOVE_MIN_SD)), 300, 800))
    p_above = 1.0 - float(ndtr(np.log(MIN_RATE_HZ / RATE_MEDIAN_HZ) / RATE_SIGMA))
    n_below = int(rng.negative_binomial(n_above, p_above))  # how many fall below 2 Hz on the way
    rates = np.concatenate(
        [_truncated_lognormal(rng, n_above, True), _truncated_lognormal(rng, n_below, False)]
    )
    rates = rates[rng.permutation(rates.size)]
    n = rates.size
    good = rng.random(n) < P_GOOD
    label = np.where(
        good, 1.0, rng.choice(np.array([0.0, 1.0 / 3.0, 2.0 / 3.0]), size=n, p=[0.3, 0.35, 0.35])
    )
    channel = np.sort(rng.integers(0, N_CHANNELS, n))  # kilosort numbers clusters roughly by depth
    depth = layout.local_coords[channel, 1] + rng.uniform(-10.0, 10.0, n)
    region = layout.regions[channel]
    amp = 80e-6 * np.exp(0.4 * rng.standard_normal(n)) * np.where(good, 1.4, 1.0)
    mean, sd = region_tuning()
    r_idx = np.searchsorted(np.array(sorted(REGIONS)), region)
    order = np.argsort(np.array(REGIONS))  # map sorted index -> REGIONS row
    rows = order[r_idx]
    gain = np.exp(0.3 * rng.standard_normal(n))[:, None]
    loadings = gain * (mean[rows] + sd[rows] * rng.standard_normal((n, N_LATENTS)))  # (N, L)
    return ProbeUnits(
        cluster_ids=np.arange(n, dtype=np.int64),
        base_rate=rates,
        label=label,
        channel=channel.astype(np.int64),
        depth=depth,
        region=region,
        amp=amp,
        loadings=loadings.astype(np.float32),
        log_offset=np.log(rates).astype(np.float32),
    )


def unit_rates(z: np.ndarray, loadings: np.ndarray, log_offset: np.ndarray) -> np.ndarray:
    """(M, N) float32 rates in Hz from (M, L) float32 latents: exp(log_offset + z @ loadings.T).

    The one function that turns latents into rates, used to draw spikes and to recompute ground truth.
    """
    lr = np.ascontiguousarray(z, dtype=np.float32) @ loadings.T  # (M, N) log-rate modulation
    lr += log_offset
    return np.exp(lr, out=lr)


def normalise_units(units: ProbeUnits, latents: np.ndarray, stride: int = 16) -> None:
    """Set ``log_offset`` so that each unit's mean rate over the session (subsampled) is its base rate."""
    sub = latents[::stride]
    mean_gain = np.zeros(units.n_units)
    for s in range(0, sub.shape[0], 8192):
        mean_gain += unit_rates(sub[s : s + 8192], units.loadings, np.zeros(units.n_units, np.float32)).sum(0)
    mean_gain /= sub.shape[0]
    units.log_offset = (np.log(units.base_rate) - np.log(mean_gain)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- spikes
@numba.njit(cache=True, nogil=True)
def _draw_thinned(
    z: np.ndarray,
    loadings: np.ndarray,
    log_offset: np.ndarray,
    bound: np.ndarray,
    k_start: int,
    block_steps: int,
    step: float,
    seed: int,
    out_t: np.ndarray,
    out_u: np.ndarray,
) -> int:
    """Poisson spikes of a piecewise-constant rate by thinning; returns the count (may exceed capacity).

    z: (G, L) latents of the whole session; bound: (B, N) log of an upper bound of each unit's rate in each
    block of ``block_steps`` fine steps starting at step ``k_start``. Candidates are uniform in time at the
    bound's rate and kept with probability rate / bound, where rate = exp(log_offset + loadings . z[k]) of
    the step k that holds the candidate: an exact inhomogeneous Poisson process. Output is time-sorted.
    """
    np.random.seed(seed)  # noqa: NPY002  numba's per-thread generator: seed and draw in one call
    n_steps, n_lat = z.shape
    n_blocks, n_units = bound.shape
    cap = out_t.shape[0]
    n = 0
    for b in range(n_blocks):
        k0 = k_start + b * block_steps
        k1 = min(k0 + block_steps, n_steps)
        if k0 >= k1:
            break
        width = k1 - k0
        first = n
        for u in range(n_units):
            lam_max = np.exp(bound[b, u])
            m = np.random.poisson(lam_max * width * step)  # noqa: NPY002
            for _ in range(m):
                x = np.random.random() * width  # noqa: NPY002  position in steps within the block
                k = k0 + min(int(x), width - 1)
                lr = np.float64(log_offset[u])
                for j in range(n_lat):
                    lr += np.float64(z[k, j]) * np.float64(loadings[u, j])
                if np.random.random() * lam_max < np.exp(lr):  # noqa: NPY002
                    if n < cap:
                        out_t[n] = (k0 + x) * step
                        out_u[n] = u
                    n += 1
        if n <= cap and n > first:  # sort this block's spikes by time
            order = np.argsort(out_t[first:n])
            tt = out_t[first:n][order]
            uu = out_u[first:n][order]
            out_t[first:n] = tt
            out_u[first:n] = uu
    return n


def _latent_ranges(z: np.ndarray, block_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) max and (B, L) min of the latents in each block of ``block_steps`` fine steps."""
    n_steps = z.shape[0]
    n_blocks = -(-n_steps // block_steps)
    pad = n_blocks * block_steps - n_steps
    zz = np.concatenate([z, np.repeat(z[-1:], pad, axis=0)]) if pad else z
    zz = zz.reshape(n_blocks, block_steps, z.shape[1])  # (B, S, L)
    return zz.max(axis=1), zz.min(axis=1)


def _log_bounds(z_max: np.ndarray, z_min: np.ndarray, units: ProbeUnits) -> np.ndarray:
    """(B, N) float32 log upper bound of each unit's rate per block, from the latents' range in the block."""
    w = units.loadings  # (N, L) float32
    hi = z_max @ np.maximum(w, 0.0).T  # (B, N)
    hi += z_min @ np.minimum(w, 0.0).T
    hi += units.log_offset + np.float32(1e-3)  # margin for float32 rounding
    return np.ascontiguousarray(hi, dtype=np.float32)


def _draw_chunk(
    z: np.ndarray,
    units: ProbeUnits,
    ranges: tuple[np.ndarray, np.ndarray],
    b0: int,
    block_steps: int,
    step: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Blocks ``b0`` onwards (as many as ``ranges`` holds): (S_c,) spike times and (S_c,) unit rows."""
    bound = _log_bounds(ranges[0], ranges[1], units)  # (B_c, N)
    candidates = float(np.exp(bound, dtype=np.float64).sum()) * block_steps * step
    cap = int(candidates + 10.0 * np.sqrt(candidates) + 256)
    while True:
        out_t = np.empty(cap, dtype=np.float64)  # (cap,) spike times s
        out_u = np.empty(cap, dtype=np.int64)  # (cap,) unit row
        n = _draw_thinned(
            z,
            units.loadings,
            units.log_offset,
            bound,
            b0 * block_steps,
            block_steps,
            step,
            seed,
            out_t,
            out_u,
        )
        if n <= cap:
            return out_t[:n], out_u[:n]
        cap = n  # redo with room: same seed, same realisation


def draw_spikes(
    units: ProbeUnits,
    latents: np.ndarray,
    step: float,
    seed: int,
    block_steps: int = 40,
    blocks_per_chunk: int = 512,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(S,) float64 sorted spike times s and (S,) int64 cluster ids of one probe; the grid starts at t = 0.

    Chunks of blocks have their own seeds and run on a thread pool (the kernel releases the GIL); the
    result does not depend on the number of workers.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    rs = np.random.default_rng(seed)
    z = np.ascontiguousarray(latents, dtype=np.float32)
    z_max, z_min = _latent_ranges(z, block_steps)  # (B, L) each
    starts = list(range(0, z_max.shape[0], blocks_per_chunk))
    seeds = rs.integers(2**31, size=len(starts))

    def task(i: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(starts[i], starts[i] + blocks_per_chunk)
        return _draw_chunk(z, units, (z_max[sl], z_min[sl]), starts[i], block_steps, step, int(seeds[i]))

    n_workers = workers or min(len(starts), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        parts = list(pool.map(task, range(len(starts))))
    times = np.concatenate([t for t, _ in parts])
    clusters = units.cluster_ids[np.concatenate([u for _, u in parts])]
    return times, clusters


# ---------------------------------------------------------------------------------------------- tables
def cluster_tables(
    rng: np.random.Generator, units: ProbeUnits, spike_clusters: np.ndarray, duration: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """clusters.metrics (cluster_id, label, firing_rate, ...) and clusters.uuids ('uuids') tables."""
    import uuid

    n = units.n_units
    counts = np.bincount(spike_clusters, minlength=n)
    metrics = pd.DataFrame(
        {
            "cluster_id": units.cluster_ids,
            "label": units.label,
            "firing_rate": counts / duration,
            "spike_count": counts,
            "amp_median": units.amp,
            "amp_max": units.amp * 1.6,
            "amp_min": units.amp * 0.6,
            "contamination": np.where(units.label == 1.0, rng.uniform(0, 0.08, n), rng.uniform(0, 0.5, n)),
            "presence_ratio": np.where(
                units.label == 1.0, rng.uniform(0.9, 1.0, n), rng.uniform(0.3, 1.0, n)
            ),
            "noise_cutoff": rng.uniform(0.0, 10.0, n),
            "slidingRP_viol": (units.label >= 2.0 / 3.0).astype(np.float64),
            "ks2_label": np.where(units.label == 1.0, "good", "mua"),
            "depths": units.depth,
            "channels": units.channel,
        }
    )
    uuids = pd.DataFrame({"uuids": [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]})
    return metrics, uuids
