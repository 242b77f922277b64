"""Tier 2: sampling grids and training-timestep rules against the reference libraries and transcriptions of the
reference samplers (diffusers 0.42.1 schedulers and pipeline functions; Flow-Factory a0b2bc5, official AWM be51372).

No pipeline weights: each grid is the scheduler's ``sigmas`` after ``retrieve_timesteps`` with the arguments the
pipeline passes, on a scheduler built from the model family's scheduler config."""

import numpy as np
import pytest

from normguard_jax.flow import schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux import pipeline_flux  # noqa: E402
from diffusers.pipelines.flux2 import pipeline_flux2_klein  # noqa: E402
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as pipeline_sd3  # noqa: E402

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev and the
# FLUX.2 family (diffusers/FLUX.2-dev-bnb-4bit; klein reproduces the grid of issue 12 item 5 with it)
SD35 = dict(num_train_timesteps=1000, shift=3.0)
FLUX1 = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
             max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
FLUX2 = dict(FLUX1, time_shift_type="exponential", shift_terminal=None, invert_sigmas=False)


def _sigmas(config, num_steps, **kwargs):
  sched = diffusers.FlowMatchEulerDiscreteScheduler(**config)
  pipeline_sd3.retrieve_timesteps(sched, num_steps, "cpu", **kwargs)
  return sched.sigmas.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("k", [1, 2, 10, 28, 40])
def test_diffusers_grid_equals_the_sd3_pipeline_scheduler(k):
  """``StableDiffusion3Pipeline`` (pipeline_stable_diffusion_3.py:1015-1040) on SD3.5's scheduler: no sigmas, no mu."""
  want, _ = _sigmas(SD35, k, sigmas=None)
  np.testing.assert_allclose(schedules.sampling_grid(k, shift=3.0, kind="diffusers"), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [8, 10, 14])
def test_linear_grid_equals_flow_factory_sd3_sigmas(k):
  """Flow-Factory's ``set_scheduler_timesteps`` (scheduler/flow_match_euler_discrete.py:49-77) on SD3.5."""
  want, _ = _sigmas(SD35, k, sigmas=np.linspace(1.0, 1 / k, k))
  np.testing.assert_allclose(schedules.sampling_grid(k, shift=3.0), want, atol=1e-6, rtol=0)


def _packed_tokens(res):
  return (res // 16) * (res // 16)  # latents.shape[1] after prepare_latents: 8x VAE, 2x2 packing


@pytest.mark.parametrize("res", [384, 1024])
@pytest.mark.parametrize("k", [8, 28])
def test_flux1_grid_equals_the_flux_pipeline_scheduler(res, k):
  """``FluxPipeline`` (pipeline_flux.py:823-841): sigmas linspace(1, 1/K, K), mu = ``calculate_shift``."""
  seq = _packed_tokens(res)
  mu = pipeline_flux.calculate_shift(seq, 256, 4096, 0.5, 1.15)
  assert schedules.flux_mu(seq) == pytest.approx(mu, abs=1e-12)
  want, _ = _sigmas(FLUX1, k, sigmas=np.linspace(1.0, 1 / k, k), mu=mu)
  np.testing.assert_allclose(schedules.sampling_grid(k, mu=schedules.flux_mu(seq)), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("res", [384, 1024, 2048])
@pytest.mark.parametrize("k", [8, 28])
def test_flux2_klein_grid_equals_the_klein_pipeline_scheduler(res, k):
  """``Flux2KleinPipeline`` (pipeline_flux2_klein.py:814-824): sigmas linspace(1, 1/K, K), mu =
  ``compute_empirical_mu(image_seq_len, K)`` (2048^2 takes its > 4300-token branch)."""
  seq = _packed_tokens(res)
  mu = pipeline_flux2_klein.compute_empirical_mu(seq, k)
  assert schedules.flux2_empirical_mu(seq, k) == mu
  want, _ = _sigmas(FLUX2, k, sigmas=np.linspace(1.0, 1 / k, k), mu=mu)
  np.testing.assert_allclose(schedules.sampling_grid(k, mu=schedules.flux2_empirical_mu(seq, k)), want, atol=1e-6,
                             rtol=0)


@pytest.mark.parametrize("k", [4, 28])
def test_diffusers_grid_with_dynamic_shifting_equals_the_scheduler_default(k):
  want, _ = _sigmas(FLUX1, k, sigmas=None, mu=1.1)
  np.testing.assert_allclose(schedules.sampling_grid(k, mu=1.1, kind="diffusers"), want, atol=1e-6, rtol=0)


# --- training-timestep rules --------------------------------------------------------------------------------------

def _awm_discrete(num_steps, fraction, t_count, rand_u, wo_init):
  """Official AWM ``time_type`` 'discrete' / 'discrete_wo_init' (train_sd3_awm.py:1172-1177, :1198-1203)."""
  boundaries = torch.linspace(1 if wo_init else 0, int(num_steps * fraction), steps=t_count + 1)
  lower_bounds, upper_bounds = boundaries[:-1].long(), boundaries[1:].long()
  return lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long(), (lower_bounds, upper_bounds)


def _ff_discrete(ts, fraction, t_count, rand_u, include_init):
  """Flow-Factory ``TimeSampler.discrete`` + ``_stratified_sample`` (utils/noise_schedule.py:184-259),
  timestep_range = fraction (i.e. (0, fraction)), force_init False; ``ts`` = ``scheduler.timesteps``."""
  ts = ts.float()
  t_min, t_max = 1000.0 * (1.0 - fraction), 1000.0 * (1.0 - 0.0)
  valid_indices = torch.where((ts >= t_min - 1e-3) & (ts <= t_max + 1e-3))[0]
  min_idx, max_idx = int(valid_indices.min().item()), int(valid_indices.max().item())
  start_idx = min_idx if include_init else min_idx + 1
  boundaries = torch.linspace(start_idx, max_idx, t_count + 1)
  lower, upper = boundaries[:-1].long(), boundaries[1:].long()
  t_indices = lower + (rand_u * (upper - lower)).long()
  return t_indices.clamp(min=0, max=len(ts) - 1), (lower, upper)


def test_integer_strata_equal_torch_linspace_floors_up_to_13_strata():
  """The references floor float32 ``torch.linspace``; our integer floors agree for every span < 80 and T <= 13."""
  for start in (0, 1):
    for end in range(start, 80):
      for t_count in range(1, 14):
        want = torch.linspace(start, end, t_count + 1).long().numpy()
        got = start + ((end - start) * np.arange(t_count + 1)) // t_count
        np.testing.assert_array_equal(got, want, err_msg=f"{start} {end} {t_count}")


_U = np.concatenate([np.linspace(0.0, 1.0, 997, endpoint=False), [1.0 - 2.0 ** -24]]).astype(np.float32)


def _check_rule(rule, num_steps, grid, fraction, t_count, reference):
  """Same uniforms -> same indices; the same strata; the reachable set (u on a dense grid) = the window."""
  lower, upper = schedules.train_index_strata(num_steps, grid, t_count, rule=rule, fraction=fraction)
  reach = set()
  u = torch.from_numpy(np.repeat(_U[:, None], t_count, axis=1))
  want, (lo, hi) = reference(u)
  np.testing.assert_array_equal(lower, lo.numpy())
  np.testing.assert_array_equal(upper, hi.numpy())
  got = np.asarray(schedules.stratified_indices(u.numpy(), lower, upper, num_steps))
  np.testing.assert_array_equal(got, want.numpy())
  reach.update(want.numpy().ravel().tolist())
  assert schedules.train_index_window(num_steps, grid, t_count, rule=rule, fraction=fraction) == tuple(sorted(reach))


@pytest.mark.parametrize("wo_init", [False, True])
def test_index_range_rules_equal_official_awm(wo_init):
  rule = "index_range_wo_init" if wo_init else "index_range"
  for k in (8, 10, 14, 28):
    for fraction in (0.5, 0.7, 0.9, 1.0):
      for t_count in (1, 2, 4, 6):
        if int(k * fraction) < (1 if wo_init else 0) + 1:
          continue
        _check_rule(rule, k, None, fraction, t_count,
                    lambda u: _awm_discrete(k, fraction, t_count, u, wo_init))


@pytest.mark.parametrize("family", ["sd35", "flux1_512", "flux2_384"])
@pytest.mark.parametrize("include_init", [True, False])
def test_value_range_rules_equal_flow_factory(family, include_init):
  """Our grid's values choose the same window as FF's ``scheduler.timesteps`` (the diffusers scheduler's, built the
  way FF builds them), with the same strata and draws."""
  rule = "value_range" if include_init else "value_range_wo_init"
  for k in (8, 10, 14, 28):
    if family == "sd35":
      ours, (_, ts) = schedules.sampling_grid(k, 3.0), _sigmas(SD35, k, sigmas=np.linspace(1.0, 1 / k, k))
    elif family == "flux1_512":
      mu = schedules.flux_mu(_packed_tokens(512))
      ours, (_, ts) = schedules.sampling_grid(k, mu=mu), _sigmas(FLUX1, k, sigmas=np.linspace(1.0, 1 / k, k), mu=mu)
    else:
      mu = schedules.flux2_empirical_mu(_packed_tokens(384), k)
      ours, (_, ts) = schedules.sampling_grid(k, mu=mu), _sigmas(FLUX2, k, sigmas=np.linspace(1.0, 1 / k, k), mu=mu)
    for fraction in (0.3, 0.5, 0.7, 0.9, 0.99, 1.0):
      for t_count in (1, 2, 4, 6):
        if not include_init and np.sum(ts >= 1000 * (1 - fraction) - 1e-3) < 2:
          continue  # FF would stratify an empty span; ours refuses it (tested in test_schedules.py)
        _check_rule(rule, k, ours, fraction, t_count,
                    lambda u: _ff_discrete(torch.from_numpy(ts), fraction, t_count, u, include_init))
