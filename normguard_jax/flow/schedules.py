"""Time grids and training-timestep samplers.

t in [0, 1] with t = 1 pure noise (DESIGN.md §1). Sampling grids run from 1 to 0 and carry the SD3
static shift or the FLUX resolution-dependent shift; diffusers timesteps are 1000 t.

Reference code read (commits as in recipe_fidelity.md): diffusers 0.42.1 ``FlowMatchEulerDiscreteScheduler``
and its SD3 / FLUX.1 / FLUX.2-klein pipelines; Flow-Factory ``X-GenGroup/Flow-Factory@a0b2bc5``; official
DiffusionNFT ``NVlabs/DiffusionNFT@24af555``; official AWM ``scxue/advantage_weighted_matching@be51372``.
"""

import jax
import jax.numpy as jnp
import numpy as np

TRAIN_T_SAMPLERS = ("uniform", "logit_normal", "discrete")
GRID_KINDS = ("linear", "diffusers")
TRAIN_INDEX_RULES = ("index_fraction", "index_range", "index_range_wo_init", "value_range", "value_range_wo_init",
                     "random_subset")


def shift_time(t, shift):
  """SD3 static shift (Esser et al. 2024, eq. 23): t' = s t / (1 + (s - 1) t). shift = 1 is identity."""
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def flux_time_shift(t, mu, sigma=1.0):
  """FLUX resolution-dependent shift: t' = e^mu / (e^mu + (1/t - 1)^sigma); t' = 0 at t = 0."""
  t = jnp.asarray(t, jnp.float32)
  safe = jnp.where(t > 0, t, 1.0)
  out = jnp.exp(mu) / (jnp.exp(mu) + (1.0 / safe - 1.0) ** sigma)
  return jnp.where(t > 0, out, 0.0)


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
  """FLUX.1 mu, linear in the number of image tokens: diffusers ``calculate_shift``
  (pipelines/flux/pipeline_flux.py:72-83) with the FLUX.1 scheduler config's anchors."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * m + (base_shift - m * base_seq_len)


def flux2_empirical_mu(image_seq_len, num_steps):
  """FLUX.2 / FLUX.2-klein mu: diffusers ``compute_empirical_mu`` (pipelines/flux2/pipeline_flux2_klein.py:63-78,
  called at :818 with ``latents.shape[1]`` = (H/16)(W/16) image tokens and the number of sampling steps).

  Two fitted lines in the token count, for 10 and 200 steps, interpolated linearly in ``num_steps``; above
  4300 tokens only the 200-step line. At 384^2 (576 tokens) and 8 steps mu = 1.963.
  """
  a1, b1 = 8.73809524e-05, 1.89833333
  a2, b2 = 0.00016927, 0.45666666
  if image_seq_len > 4300:
    return float(a2 * image_seq_len + b2)
  m_200 = a2 * image_seq_len + b2
  m_10 = a1 * image_seq_len + b1
  a = (m_200 - m_10) / 190.0
  b = m_200 - 200.0 * a
  return float(a * num_steps + b)


def _shift_np(sigmas, shift, mu):
  """float64 numpy twin of :func:`shift_time` / :func:`flux_time_shift` (the scheduler's step 2)."""
  if mu is not None:
    return np.exp(mu) / (np.exp(mu) + (1.0 / sigmas - 1.0))
  return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def _diffusers_default_sigmas(num_steps, shift, mu, num_train_timesteps):
  """``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` without custom sigmas, in float64
  (scheduling_flow_match_euler_discrete.py: ``__init__`` builds sigmas = shift(linspace(1, N, N)[::-1] / N) in
  float32, unshifted under dynamic shifting, and keeps sigma_min/max; ``set_timesteps`` takes
  linspace(N sigma_max, N sigma_min, K) / N and shifts again, then appends 0)."""
  n = num_train_timesteps
  ends = np.array([1.0, 1.0 / n], np.float32)  # the first and last of linspace(1, N, N)[::-1] / N, in float32
  if mu is None:
    ends = (np.float32(shift) * ends / (1 + (np.float32(shift) - 1) * ends)).astype(np.float32)
  sigma_max, sigma_min = float(ends[0]), float(ends[1])
  sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
  return _shift_np(sigmas, shift, mu)


def sampling_grid(num_steps, shift=1.0, mu=None, kind="linear", *, num_train_timesteps=1000):
  """Descending grid t_0 = 1 > t_1 > ... > t_K = 0 of K = num_steps sampler intervals.

  kind 'linear' (today's grid): linspace(1, 1/K, K), shifted, then 0. This is Flow-Factory's grid for
    every model (scheduler/flow_match_euler_discrete.py:57) and, with ``mu``, exactly diffusers' ``FluxPipeline``
    (pipeline_flux.py:823-841: sigmas linspace(1, 1/K, K), dynamic shift by mu) and ``Flux2KleinPipeline``
    (pipeline_flux2_klein.py:814-824, mu from :func:`flux2_empirical_mu`).
  kind 'diffusers': the scheduler's own default grid, as ``StableDiffusion3Pipeline`` (and the official
    DiffusionNFT / AWM / flow_grpo SD3 rollouts, e.g. DiffusionNFT pipeline_with_logprob.py:179-184) get it
    from ``set_timesteps(K)``: linspace(sigma_max, sigma_min, K) with sigma_min = shift(1 / N) already shifted,
    shifted again, then 0. At K = 10, shift 3 it ends ... 0.465, 0.278, 0.009, 0. Computed in float64 from the
    Python arguments (so they must be concrete) and rounded to float32, as the scheduler does.
  ``mu`` (FLUX dynamic shifting) replaces the static ``shift``.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if kind == "linear":
    t = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
    return flux_time_shift(t, mu) if mu is not None else shift_time(t, shift)
  if kind == "diffusers":
    sigmas = _diffusers_default_sigmas(int(num_steps), float(shift), None if mu is None else float(mu),
                                       int(num_train_timesteps))
    return jnp.asarray(np.append(sigmas.astype(np.float32), np.float32(0.0)))
  raise ValueError(f"unknown sampling grid kind {kind!r}; expected one of {GRID_KINDS}")


def sample_train_t(key, shape, kind="logit_normal", *, mean=0.0, std=1.0, shift=1.0, t_min=0.0, t_max=1.0):
  """Training timesteps for forward-process losses.

  uniform: U[t_min, t_max]; logit_normal: sigmoid(N(mean, std)) (SD3 eq. 19, 'logit_normal' weighting
  in diffusers); both then shifted. The 'discrete' kind lives in :func:`sample_grid_indices`.
  """
  if kind == "uniform":
    t = jax.random.uniform(key, shape, minval=t_min, maxval=t_max)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))
    t = t_min + (t_max - t_min) * t
  else:
    raise ValueError(f"unknown train t sampler {kind!r}; expected 'uniform' or 'logit_normal'")
  return shift_time(t, shift)


def sample_grid_indices(key, batch_size, num_steps, num_train_timesteps, fraction=1.0):
  """Stratified sampler indices per sample (NFT/AWM 'discrete'): the first ``int(K * fraction)`` grid
  steps are split into ``num_train_timesteps`` strata and one index is drawn in each, in random order.
  Returns int32 (num_train_timesteps, batch_size)."""
  usable = max(int(num_steps * fraction), 1)
  if num_train_timesteps > usable:
    raise ValueError(f"num_train_timesteps={num_train_timesteps} exceeds the {usable} usable sampler steps")
  edges = jnp.linspace(0, usable, num_train_timesteps + 1)
  k1, k2 = jax.random.split(key)
  u = jax.random.uniform(k1, (num_train_timesteps, batch_size))
  idx = jnp.floor(edges[:-1, None] + u * (edges[1:, None] - edges[:-1, None])).astype(jnp.int32)
  idx = jnp.clip(idx, 0, usable - 1)
  perm = jax.vmap(lambda k: jax.random.permutation(k, num_train_timesteps))(jax.random.split(k2, batch_size))
  return jnp.take_along_axis(idx, perm.T, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Training-timestep rules of the reference codes (NFT / AWM forward-process batches)
# ----------------------------------------------------------------------------------------------------------------

def _check_rule_args(num_steps, num_train_timesteps, rule, fraction):
  if rule not in TRAIN_INDEX_RULES:
    raise ValueError(f"unknown training-timestep rule {rule!r}; expected one of {TRAIN_INDEX_RULES}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if num_train_timesteps < 1:
    raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")


def _value_range_span(num_steps, grid, fraction):
  """Flow-Factory's window (utils/noise_schedule.py:208-218): indices i < K whose scheduler timestep
  ts_i = 1000 t_i lies in [1000 (1 - fraction) - 1e-3, 1000 + 1e-3]; returns (min_i, max_i)."""
  if grid is None:
    raise ValueError("the value_range rules need the sampling grid (its values choose the window)")
  try:
    g = np.asarray(grid, np.float32)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError("the value_range rules need a concrete sampling grid: build it with sampling_grid() outside "
                     "jit and pass it in (the window is a static index range)") from e
  if g.shape != (num_steps + 1,):
    raise ValueError(f"grid has shape {g.shape}; expected ({num_steps + 1},) for num_steps={num_steps}")
  ts = g[:-1] * np.float32(1000.0)  # scheduler.timesteps (float32), the trailing 0 is not a timestep
  t_min, t_max = 1000.0 * (1.0 - fraction), 1000.0
  valid = np.nonzero((ts >= np.float32(t_min - 1e-3)) & (ts <= np.float32(t_max + 1e-3)))[0]
  if valid.size == 0:
    raise ValueError(f"timestep fraction {fraction} keeps no sampler step of the grid")
  return int(valid.min()), int(valid.max())


def train_index_strata(num_steps, grid, num_train_timesteps, *, rule, fraction=1.0):
  """Static strata (lower, upper) int arrays of the stratified reference rules; index j is drawn as
  lower_j + floor(u_j (upper_j - lower_j)), u_j ~ U[0, 1) (= lower_j when upper_j = lower_j).

  index_range / index_range_wo_init: official AWM ``time_type`` 'discrete' / 'discrete_wo_init'
    (train_sd3_awm.py:1172-1180, :1198-1204): boundaries linspace(s, int(K fraction), T + 1), s = 0 / 1.
  value_range / value_range_wo_init: Flow-Factory ``TimeSampler.discrete`` with include_init True / False
    (utils/noise_schedule.py:208-259): boundaries linspace(s, max_i, T + 1) over the value window
    [min_i, max_i] of :func:`_value_range_span`, s = min_i / min_i + 1.
  The references truncate float32 ``torch.linspace`` boundaries with ``.long()``; here they are exact integer
  floors, which equal torch's for T <= 13 strata (checked against torch for every span < 80 in the tests).
  """
  _check_rule_args(num_steps, num_train_timesteps, rule, fraction)
  if rule.startswith("index_range"):
    start, end = (0 if rule == "index_range" else 1), int(num_steps * fraction)
  elif rule.startswith("value_range"):
    lo, end = _value_range_span(num_steps, grid, fraction)
    start = lo if rule == "value_range" else lo + 1
  else:
    raise ValueError(f"rule {rule!r} is not a stratified rule")
  if end < start:
    raise ValueError(f"training-timestep rule {rule!r} with fraction {fraction} on {num_steps} steps leaves no "
                     f"sampler step (index range [{start}, {end}])")
  edges = start + ((end - start) * np.arange(num_train_timesteps + 1)) // num_train_timesteps
  return edges[:-1].astype(np.int32), edges[1:].astype(np.int32)


def train_index_window(num_steps, grid, num_train_timesteps, *, rule, fraction=1.0):
  """The sorted tuple of grid indices that ``rule`` can draw (its support), for validation and reports."""
  _check_rule_args(num_steps, num_train_timesteps, rule, fraction)
  if rule == "random_subset":
    return tuple(range(num_steps))
  if rule == "index_fraction":
    return tuple(range(max(int(num_steps * fraction), 1)))
  lower, upper = train_index_strata(num_steps, grid, num_train_timesteps, rule=rule, fraction=fraction)
  reach = set()
  for lo, hi in zip(lower.tolist(), upper.tolist()):
    reach.update(range(lo, hi) if hi > lo else [lo])
  return tuple(sorted(i for i in reach if 0 <= i < num_steps))


def stratified_indices(u, lower, upper, num_steps):
  """lower + floor(u (upper - lower)), clamped to [0, K - 1]: the draw of Flow-Factory's ``_stratified_sample``
  (utils/noise_schedule.py:256-259 and :237) and of official AWM (train_sd3_awm.py:1174-1177), in float32."""
  lower, upper = jnp.asarray(lower, jnp.int32), jnp.asarray(upper, jnp.int32)
  off = jnp.floor(u.astype(jnp.float32) * (upper - lower).astype(jnp.float32)).astype(jnp.int32)
  return jnp.clip(lower + off, 0, num_steps - 1)


def sample_train_indices(key, num_steps, grid, batch_size, num_train_timesteps, *, rule="index_fraction",
                         fraction=1.0, share_rows=0):
  """Grid indices of the training timesteps of an NFT/AWM batch: int32 (T, B), T = ``num_train_timesteps``;
  row j holds the j-th timestep of each sample, t = grid[idx].

  rule 'index_fraction': :func:`sample_grid_indices` (today's rule): T continuous strata over the first
    int(K fraction) indices, index 0 (t = 1) included, in random order per draw.
  rule 'index_range' / 'index_range_wo_init': official AWM (see :func:`train_index_strata`), strata in order.
  rule 'value_range' / 'value_range_wo_init': Flow-Factory ``discrete`` / ``discrete_wo_init``: the indices
    whose t >= 1 - fraction (never the last of them, as FF's strata exclude their upper edge), strata in order.
  rule 'random_subset': official DiffusionNFT (train_nft_sd3.py:569, :807-816, :874): a uniformly random
    permutation of all K sampler steps per sample, of which the first T are trained (the reference sets
    T = int(K * timestep_fraction), 9 of 10 at 0.99); ``fraction`` is not used.
  ``share_rows`` N > 0: each block of N consecutive rows shares one draw (Flow-Factory draws once per device
  batch, official AWM once per training micro-batch); 0 = one draw per sample (official NFT, today's rule).
  The grid is needed (concrete) only by the value_range rules.
  """
  _check_rule_args(num_steps, num_train_timesteps, rule, fraction)
  if share_rows < 0 or (share_rows and batch_size % share_rows):
    raise ValueError(f"share_rows={share_rows} must be 0 or divide the batch of {batch_size} rows")
  draws = batch_size // share_rows if share_rows else batch_size
  t_count = num_train_timesteps
  if rule == "index_fraction":
    idx = sample_grid_indices(key, draws, num_steps, t_count, fraction)
  elif rule == "random_subset":
    if t_count > num_steps:
      raise ValueError(f"num_train_timesteps={t_count} exceeds the {num_steps} sampler steps (rule 'random_subset')")
    steps = jnp.broadcast_to(jnp.arange(num_steps, dtype=jnp.int32), (draws, num_steps))
    perms = jax.random.permutation(key, steps, axis=1, independent=True)  # one permutation of the K steps per draw
    idx = perms[:, :t_count].T
  else:
    lower, upper = train_index_strata(num_steps, grid, t_count, rule=rule, fraction=fraction)
    u = jax.random.uniform(key, (t_count, draws), jnp.float32)
    idx = stratified_indices(u, lower[:, None], upper[:, None], num_steps)
  return jnp.repeat(idx, share_rows, axis=1) if share_rows else idx


def forward_noise(x0, eps, t):
  """x_t = (1 - t) x0 + t eps, the rectified-flow interpolation."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * eps
