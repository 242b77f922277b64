"""Ahead-of-time compile of a recipe's own programs (normguard_jax/parallel/aot.py, issue 13).

One module fixture runs the tool three times on simulated CPU devices (cpu:2, cpu:4, cpu:8) for the SD3.5 NFT recipe
with a tiny scanned MMDiT (the tiny_snapshot sizes), at one row per chip; the tests read its JSON reports.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from normguard_jax.parallel import aot
from normguard_jax.tools import tiny_snapshot

RECIPE = "configs/sd35_medium_nft.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_weights_dir(tmp_path_factory):
  """A diffusers layout with only the two config.json files the tool reads: a 3-block MMDiT (blocks 0-1 scanned)."""
  d = tmp_path_factory.mktemp("tiny_sd35")
  transformer = dict(tiny_snapshot.SD35_TRANSFORMER, _class_name="SD3Transformer2DModel", num_layers=3,
                     dual_attention_layers=[])
  vae = dict(tiny_snapshot.SD35_VAE, _class_name="AutoencoderKL")
  for name, config in (("transformer", transformer), ("vae", vae)):
    os.makedirs(d / name)
    with open(d / name / "config.json", "w") as f:
      json.dump(config, f)
  return str(d)


@pytest.fixture(scope="module")
def reports(tiny_weights_dir, tmp_path_factory):
  """{chips: (exit status, report)} of the tool at fsdp 2, 4 and 8, one row per chip (all three programs at 8)."""
  out = {}
  for n in (2, 4, 8):
    path = str(tmp_path_factory.mktemp("aot") / f"cpu{n}.json")
    programs = "train_step,rollout,vae_decode" if n == 8 else "train_step,rollout"
    hbm = []
    if n == 4:  # HBM between the rollout's and the train step's peaks at fsdp 2: the step does not fit, the rollout does
      peaks = sorted(out[2][1]["programs"][p]["memory"]["peak_bytes"] for p in ("rollout", "train_step"))
      hbm = ["--hbm-gib", repr(sum(peaks) / 2 / 2 ** 30)]
    rc = aot.main(["--config", os.path.join(ROOT, RECIPE), "--topology", f"cpu:{n}", "--rows-per-chip", "1",
                   "--program", programs, "--out", path, f"--config.model.weights_dir={tiny_weights_dir}",
                   "--config.model.resolution=64"] + hbm)
    with open(path) as f:
      out[n] = rc, json.load(f)
  return out


def test_per_chip_temporaries_do_not_grow_with_fsdp(reports):
  """Weak scaling (issue 13): at a fixed per-chip batch, the scanned MMDiT train step and the rollout sampler need
  the same temporaries per chip at fsdp 2, 4 and 8. Programs traced without the activation mesh fail this: XLA
  keeps the weights sharded and replicates the activations (temporaries 3-4x at fsdp 8 for this model)."""
  for program in ("train_step", "rollout"):
    temps = {n: reports[n][1]["programs"][program]["memory"]["temp_size_in_bytes"] for n in (2, 4, 8)}
    assert all(reports[n][1]["mesh"]["fsdp"] == n for n in (2, 4, 8))
    for n in (4, 8):
      assert temps[n] <= 1.25 * temps[2], f"{program}: per-chip temporaries grow with fsdp: {temps}"


def test_cli_reports_the_three_programs_on_cpu_devices(reports):
  rc, out = reports[8]
  assert rc == 0 and out["fits"]
  assert set(out["programs"]) == {"train_step", "rollout", "vae_decode"}
  assert out["method"] == "nft" and out["lora_rank"] == 32 and out["param_dtype"] == "bfloat16"
  step = out["programs"]["train_step"]
  assert step["microbatches"] == 16 and step["rows"] == 16 * 8 and step["rows_per_chip"] == 1
  for name, e in out["programs"].items():
    mem = e["memory"]
    assert set(aot.MEMORY_FIELDS) <= set(mem) and mem["temp_size_in_bytes"] > 0
    assert mem["peak_bytes"] == (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
                                 - mem["alias_size_in_bytes"] + mem["temp_size_in_bytes"]
                                 - e.get("shared_argument_bytes", 0))
    assert e["cost"]["flops_corrected"] >= e["cost"]["flops"] > 0 and e["model_flops"] > 0
  decode = out["programs"]["vae_decode"]  # task.decode on the mesh: each chip decodes only its rows
  assert decode["rows_split"] and decode["rows"] == 8 * decode["rows_per_chip"]
  rollout = out["programs"]["rollout"]  # the frozen params, passed as sampling and as reference variables
  assert 0 < rollout["shared_argument_bytes"] < rollout["memory"]["argument_size_in_bytes"] / 2
  # The scanned programs' loops are counted: 16 microbatches, the sampler's steps.
  trips = {loop["trip_count"] for loop in step["cost"]["loops"]}
  assert 16 in trips and step["cost"]["flops_corrected"] > 10 * step["cost"]["flops"]
  assert out["num_microbatches"] == 16 and out["remat"] and out["fusion"] == "split"


def test_a_program_that_does_not_fit_hbm_exits_3(reports):
  rc, out = reports[4]
  step, rollout = out["programs"]["train_step"], out["programs"]["rollout"]
  assert rc == 3 and out["fits"] is False and out["hbm_bytes"] > 0
  assert step["fits"] is False and step["hbm_headroom_bytes"] < 0
  assert rollout["fits"] is True
  assert rollout["hbm_headroom_bytes"] == int(out["hbm_bytes"] - rollout["memory"]["peak_bytes"])


def test_fit_finds_the_largest_rows_per_chip(monkeypatch):
  """--fit's search (doubling, then bisection) on a stand-in compile whose peak is 1000 bytes per row."""
  tried = []

  def lower(recipe, program, n):
    tried.append(n)
    return n, {}
  monkeypatch.setattr(aot, "lower_program", lower)
  monkeypatch.setattr(aot, "_compile", lambda lowered, platform: lowered)
  monkeypatch.setattr(aot, "memory_of", lambda n: {"peak_bytes": 1000 * n})
  recipe = type("R", (), {"platform": "cpu", "method": "nft", "batch_devices": 8})()
  found = aot.fit_rows(recipe, "train_step", hbm=37_500)
  assert found["max_rows_per_chip"] == 37 and found["peak_bytes"] == 37_000 and not found["limit_reached"]
  assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and len(tried) <= 7 + 5
  assert aot.fit_rows(recipe, "rollout", hbm=500)["max_rows_per_chip"] == 0


def test_tpu_topology_without_libtpu_says_so_and_exits_2(capsys):
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed here: the TPU path compiles instead of erroring")
  assert aot.main(["--config", os.path.join(ROOT, RECIPE), "--topology", "v5p-8"]) == 2
  assert "needs libtpu" in capsys.readouterr().err


def test_topology_names_and_presets():
  assert aot.tpu_topology_name("v5p-128") == "v5p:4x4x4" and aot.tpu_topology_name("v6e-64") == "v6e:8x8"
  assert aot.tpu_topology_name("v5p-8") == "v5p:2x2x1" and aot.tpu_topology_name("v5p:2x2x1") == "v5p:2x2x1"
  cfg, preset = aot.load_recipe(os.path.join(ROOT, "configs/flux2_klein_nft.py"), [])
  assert preset == "flux2_klein_4b" and cfg.model.weights_dir.endswith(os.path.join("presets", "flux2_klein_4b"))
  for name in aot.PRESETS:
    for component in ("transformer", "vae"):
      assert os.path.isfile(os.path.join(aot.PRESETS_DIR, name, component, "config.json"))


def test_hlo_cost_counts_loop_bodies_by_trip_count():
  """The trip-count correction against an unrolled compile of the same function: a scan of 6 matmul layers and its
  gradient, counted from the optimised HLO, matches the Python-unrolled program within 5%."""
  def net(unroll):
    def f(w, x):
      body = lambda c, wi: (jnp.tanh(c @ wi), None)
      if unroll:
        for i in range(6):
          x, _ = body(x, w[i])
        return x.sum()
      return jax.lax.scan(body, x, w)[0].sum()
    return jax.jit(jax.grad(f))
  w, x = jax.ShapeDtypeStruct((6, 64, 64), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32)
  scanned = aot.compiled_costs(net(False).lower(w, x).compile())
  unrolled = aot.compiled_costs(net(True).lower(w, x).compile())
  assert sorted(loop["trip_count"] for loop in scanned["loops"]) == [6, 6] and not unrolled["loops"]
  assert scanned["flops"] < 0.25 * unrolled["flops"]  # XLA counts each while body once
  assert scanned["flops_corrected"] == pytest.approx(unrolled["flops"], rel=0.05)
  assert scanned["hlo_walk"]["flops_once"] == pytest.approx(scanned["flops"], rel=0.01)  # the walk agrees with XLA
  assert unrolled["hlo_walk"]["bytes_once"] == pytest.approx(unrolled["bytes accessed"], rel=0.01)


def test_sharded_vae_decode_equals_the_one_device_decode(tiny_weights_dir):
  """task.decode on a mesh (each chip decodes its rows) gives the one-device decode's pixels, in chunks of
  model.decode_batch rows per chip; the rows come back split over the batch axes."""
  import numpy as np
  from normguard_jax import tasks
  from normguard_jax.parallel import mesh as mesh_lib, sharding
  cfg, _ = aot.load_recipe(os.path.join(ROOT, RECIPE), [f"model.weights_dir={tiny_weights_dir}", "model.resolution=32",
                                                         "model.decode_batch=1", "model.param_dtype=float32",
                                                         "model.dtype=float32"])
  task = tasks.make_task(cfg, text_len=8)
  shapes = aot._vae_shapes(task.vae_cfg)
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [0.2 * jax.random.normal(k, s.shape, jnp.float32)
                                               for k, s in zip(keys, leaves)])
  task._vae_params = params
  z = jax.random.normal(jax.random.PRNGKey(1), (16,) + tuple(task.latent_shape))
  want = np.asarray(task.decode(z))  # no mesh: one device
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert sharding.batch_size_divisor(mesh) == 8
  task.use_mesh(mesh)
  got = task.decode(sharding.place_rows(z, mesh))  # 2 rows per chip, decoded 1 at a time (lax.map)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_libtpu_flags_keep_the_users_values_and_the_launchers_export_the_same_list():
  """One flag list (parallel/tpu_flags.py) for the runs, the AOT check and launch/libtpu_flags.env; with libtpu
  installed, libtpu accepts every flag (an unknown one aborts its start: it did, for one flag of the old list)."""
  import subprocess
  import sys
  from normguard_jax.parallel import tpu_flags
  crs = "--xla_jf_crs_combiner_threshold_in_bytes"
  merged = tpu_flags.init_args(f"{crs}=1 --xla_user_flag=2").split()
  assert f"{crs}=1" in merged and "--xla_user_flag=2" in merged and f"{crs}=16777216" not in merged
  assert set(tpu_flags.LIBTPU_FLAGS) - {f"{crs}=16777216"} <= set(merged)
  env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
  out = subprocess.run(["bash", "-c", 'source launch/libtpu_flags.env && echo "$LIBTPU_INIT_ARGS"'], cwd=ROOT,
                       env=env, capture_output=True, text=True, check=True).stdout
  assert out.split() == list(tpu_flags.LIBTPU_FLAGS)
  if importlib.util.find_spec("libtpu") is None:
    return  # the check below needs libtpu (pip install "jax[tpu]"); CI's venvs do not have it
  probe = ("from normguard_jax.parallel import tpu_flags; tpu_flags.apply(); "
           "from jax.experimental import topologies; topologies.get_topology_desc('v5p:2x2x1', platform='tpu')")
  r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                     env=dict(env, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert r.returncode == 0 and "Unknown command line flag" not in r.stderr, r.stderr[-2000:]
