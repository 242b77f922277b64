"""Tier 1: the old/EMA decay schedules of the reference codes (train/state.py ``old_decay``)."""

import jax
import numpy as np
import pytest

from normguard_jax.train import state as state_lib


def _official_nft(step):  # DiffusionNFT train_nft_sd3.py:169-189, decay_type 1
  flat, uprate, uphold = 0, 0.001, 0.5
  return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def _ff(kind, step, decay, warmup=10, initial=0.0, flat=0, ramp=0.001):  # Flow-Factory ema_utils.py:38-102
  if kind == "power":
    return decay if warmup == 0 else min(decay, (1 + step) / (warmup + step))
  if kind == "linear":
    return decay if step >= warmup else initial + (decay - initial) * (step / warmup)
  return 0.0 if step < flat else min((step - flat) * ramp, decay)


STEPS = [0, 1, 9, 10, 299, 300, 301, 999, 1000, 5000]


def test_piecewise_linear_is_today_and_the_official_schedules():
  got = [float(state_lib.old_decay(s, 0.001, 0.5)) for s in STEPS]
  np.testing.assert_allclose(got, [_official_nft(s) for s in STEPS], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got, [_ff("piecewise_linear", s, 0.5) for s in STEPS], rtol=1e-6, atol=1e-7)
  awm = [float(state_lib.old_decay(s, 0.001, 0.3)) for s in STEPS]  # official AWM: min(0.3, 0.001 global_step)
  np.testing.assert_allclose(awm, [min(0.3, 0.001 * s) for s in STEPS], rtol=1e-6, atol=1e-7)
  flat = [float(state_lib.old_decay(s, 0.0075, 0.999, 75)) for s in (0, 74, 75, 76, 300)]  # decay_type 2
  np.testing.assert_allclose(flat, [0, 0, 0, 0.0075, 0.999], rtol=1e-6)


def test_linear_warmup_and_power_follow_flow_factory():
  lin = [float(state_lib.old_decay(s, max_decay=0.3, kind="linear_warmup", warmup=1000)) for s in STEPS]
  np.testing.assert_allclose(lin, [_ff("linear", s, 0.3, warmup=1000) for s in STEPS], rtol=1e-6, atol=1e-7)
  assert lin[STEPS.index(300)] == pytest.approx(0.09)  # FF SD3.5 AWM: 0.0003 t, not the official 0.3 at t = 300
  lin300 = [float(state_lib.old_decay(s, max_decay=0.3, kind="linear_warmup", warmup=300)) for s in STEPS]
  np.testing.assert_allclose(lin300, [min(0.001 * s, 0.3) for s in STEPS], rtol=1e-5, atol=1e-7)
  lin0 = float(state_lib.old_decay(50, max_decay=0.9, kind="linear_warmup", warmup=100, initial_decay=0.5))
  assert lin0 == pytest.approx(_ff("linear", 50, 0.9, warmup=100, initial=0.5))
  pw = [float(state_lib.old_decay(s, max_decay=0.9, kind="power")) for s in STEPS]  # FF default warmup 10
  np.testing.assert_allclose(pw, [_ff("power", s, 0.9) for s in STEPS], rtol=1e-6)
  assert pw[0] == pytest.approx(0.1) and pw[-1] == pytest.approx(0.9)
  assert float(state_lib.old_decay(3, max_decay=0.9, kind="power", warmup=0)) == pytest.approx(0.9)
  assert float(state_lib.old_decay(3, max_decay=0.7, kind="constant")) == pytest.approx(0.7)


def test_old_decay_traces_and_refuses_bad_kinds():
  f = jax.jit(lambda s: state_lib.old_decay(s, max_decay=0.9, kind="power", warmup=10))
  assert float(f(np.int32(5))) == pytest.approx(6 / 15)
  with pytest.raises(ValueError, match="EMA decay kind"):
    state_lib.old_decay(3, kind="cosine")
  with pytest.raises(ValueError, match="warmup"):
    state_lib.old_decay(3, kind="linear_warmup", warmup=0)
