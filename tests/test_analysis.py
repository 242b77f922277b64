"""Analysis commands (normguard_jax/analysis): adjoint sensitivities against central finite differences, the
rescaled sampler's per-step norm, the scalar-log readers and name mapping, and every CLI command end to end on
one smoke workdir of the main job."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import config as config_lib
from normguard_jax.analysis import __main__ as cli
from normguard_jax.analysis import adjoint, compare, sampling
from normguard_jax.analysis import workdir as workdir_lib
from normguard_jax.flow import schedules
from normguard_jax.models import dit
from normguard_jax.rewards.api import make_reward
from tests import helpers


def _tiny(seed, scale):
  """A tiny DiT with every leaf random, built on the host from the init's shapes (no compile: a compiled flax init
  plus per-leaf jax.random costs seconds here)."""
  cfg = helpers.tiny_model()
  shapes = jax.eval_shape(lambda: dit.init(cfg, jax.random.PRNGKey(0)))
  rng = np.random.RandomState(seed)
  return cfg, jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.randn(*s.shape), s.dtype), shapes)


# ----- adjoint ---------------------------------------------------------------------------------------------------

def test_adjoint_matches_central_finite_differences():
  cfg, params = _tiny(1, 0.1)
  x1 = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
  cond = jnp.arange(4, dtype=jnp.int32)
  grid = schedules.sampling_grid(3, 1.0)
  reward_fn = make_reward({"contrast": 1.0})
  vel = lambda x, t: dit.velocity(params, x, t, cond, cfg=cfg)
  with jax.default_matmul_precision("highest"):
    r, g = jax.jit(lambda: adjoint.sensitivities(x1, cond, grid, vel, reward_fn))()
    reward_eps = jax.jit(lambda e: adjoint.reward_of_eps(e, x1, cond, grid, vel, reward_fn))
    fd = adjoint.finite_differences(reward_eps, 3, 4, h=3e-2)
  g, fd = np.asarray(g), np.asarray(fd)
  assert g.shape == (3, 4) and np.all(np.abs(g) > 1e-3)
  np.testing.assert_allclose(np.asarray(r), np.asarray(reward_eps(jnp.zeros((3, 4)))), rtol=1e-6)
  assert adjoint.relative_error(g, fd) < 1e-3
  np.testing.assert_allclose(g, fd, rtol=1e-3)


def test_coherence_statistics_and_holm():
  np.testing.assert_allclose(adjoint.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
  rng = np.random.RandomState(0)
  coherent = adjoint.coherence_stats(np.stack([1.0 + 0.1 * rng.randn(40), rng.randn(40)]))
  s0, s1 = coherent["per_step"]
  assert s0["coherent"] and s0["sign_agreement"] == 1.0 and s0["p_t_holm"] < 1e-10
  assert not s1["coherent"] and s1["p_t_holm"] >= s1["p_t"]
  assert coherent["coherent_steps"] == 1 and coherent["global_scale"]["mean"] > 0.5


# ----- rescaled sampler ------------------------------------------------------------------------------------------

_MCFG = helpers.tiny_model()


def _apply(variables, x, t, c):
  return dit.velocity(variables, x, t, c, cfg=_MCFG)


@jax.jit
def _taken_vs_ref_norms(ref, xs, grid, cond, cfg_scale):
  """||(x_{k+1} - x_k) / dt_k|| and ||v_ref(x_k)|| for every step, all steps in one batched forward."""
  k, b = xs.shape[0] - 1, xs.shape[1]
  x = xs[:-1].reshape((k * b,) + xs.shape[2:])
  t = jnp.repeat(grid[:-1], b)
  v_ref = sampling.guided(_apply, ref, x, t, jnp.tile(cond, k), cfg_scale, jnp.full((k * b,), 10, jnp.int32)
                          ).reshape(xs[:-1].shape)
  step = (xs[1:] - xs[:-1]) / (grid[1:] - grid[:-1]).reshape((-1,) + (1,) * (xs.ndim - 1))
  n = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=(2, 3, 4)))
  return n(step), n(v_ref)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_rescaled_sampler_steps_with_the_reference_norm(cfg_scale):
  _, ref = _tiny(1, 0.05)
  _, pol = _tiny(7, 0.2)  # a different, larger-weight policy: its norm differs from the reference's
  x1 = jax.random.normal(jax.random.PRNGKey(3), (3, 8, 8, 1))
  cond = jnp.array([1, 2, 3], jnp.int32)
  grid = schedules.sampling_grid(4, 3.0)
  kw = dict(policy_apply=_apply, ref_apply=_apply, cfg_scale=cfg_scale, uncond=jnp.full_like(cond, 10))
  ro = sampling.paired_sample_jit(pol, ref, x1, cond, grid, drive="rescaled", **kw)
  np.testing.assert_allclose(ro["norm_drive"], ro["norm_ref"], rtol=1e-5)
  assert np.max(np.abs(np.asarray(ro["rho"]) - 1)) > 0.05  # the raw policy is off the reference norm
  taken, n_ref = _taken_vs_ref_norms(ref, ro["xs"], grid, cond, jnp.float32(cfg_scale))
  np.testing.assert_allclose(taken, n_ref, rtol=1e-4)  # the step actually taken has the reference's norm
  plain = sampling.paired_sample_jit(pol, ref, x1, cond, grid, drive="policy", **kw)
  assert not np.allclose(plain["x0"], ro["x0"])


# ----- scalar logs -----------------------------------------------------------------------------------------------

def _torch_logs(tmp):
  from tensorboardX import SummaryWriter
  tb = tmp / "torch_run" / "tb"
  w = SummaryWriter(str(tb))
  for s in range(5):
    w.add_scalar("train/reward_mean", 0.5 + 0.1 * s, s)
    w.add_scalar("train/kl_div", 0.01 * s, s)
    w.add_scalar("train/reward_pickscore_mean", 20.0 + s, s)
    w.add_scalar("train/something_else", 1.0, s)
  w.close()
  with open(tmp / "torch_run" / "extra.csv", "w") as f:
    f.write("step,loss,grad_norm\n0,1.5,0.3\n2,1.25,0.2\n4,1.0,\n")
  return tmp / "torch_run"


def test_readers_and_flow_factory_name_mapping(tmp_path):
  run = _torch_logs(tmp_path)
  (ev,) = [p for p in (run / "tb").iterdir() if "tfevents" in p.name]
  sc = compare.read_scalars(str(ev))
  steps, vals = sc["train/reward_mean"]
  np.testing.assert_array_equal(steps, np.arange(5))
  np.testing.assert_allclose(vals, 0.5 + 0.1 * np.arange(5), rtol=1e-6)
  both = compare.read_scalars(str(run))
  np.testing.assert_allclose(both["loss"][1], [1.5, 1.25, 1.0])
  np.testing.assert_array_equal(both["grad_norm"][0], [0, 2])  # empty cell skipped
  ours = ["train/reward_mean", "train/kl_ref", "train/loss", "train/grad_norm", "train/ng_mean_rho"]
  m = lambda n, **kw: compare.map_name(n, ours, **kw)
  assert m("train/reward_mean") == "train/reward_mean" and m("train/kl_div") == "train/kl_ref"
  assert m("train/reward_pickscore_mean") == "train/reward_pickscore"
  assert m("eval/reward_hpsv3_mean") == "eval/reward_hpsv3" and m("loss") == "train/loss"
  assert m("ng_mean_rho") == "train/ng_mean_rho" and m("train/something_else") is None
  assert m("train/something_else", user={"train/something_else": "train/loss"}) == "train/loss"
  with open(tmp_path / "long.csv", "w") as f:
    f.write("step,tag,value\n1,kl,0.5\n2,kl,0.25\n")
  with open(tmp_path / "run-x-tag-train_reward_mean.csv", "w") as f:
    f.write("Wall time,Step,Value\n1.0,3,0.7\n")
  with open(tmp_path / "log.jsonl", "w") as f:
    f.write('{"step": 1, "reward_mean": 0.1, "note": "x"}\n\n{"step": 2, "reward_mean": 0.2}\n')
  np.testing.assert_allclose(compare.read_scalars(str(tmp_path / "long.csv"))["kl"][1], [0.5, 0.25])
  assert list(compare.read_scalars(str(tmp_path / "run-x-tag-train_reward_mean.csv"))) == ["train_reward_mean"]
  np.testing.assert_allclose(compare.read_scalars(str(tmp_path / "log.jsonl"))["reward_mean"][1], [0.1, 0.2])


# ----- the CLI on a smoke workdir -----------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_workdir(digits_smoke):
  """The session's digits smoke workdir (tests/conftest.py); the analysis commands read its nft_ng run."""
  return digits_smoke[0]


RUNS = ["--runs", "nft_ng"]


def _outputs(out, *names):
  for n in names:
    assert (out / n).stat().st_size > 0, n
  return json.loads((out / names[0]).read_text())


def test_loader_restores_final_policy_and_reference(smoke_workdir):
  wd = workdir_lib.load_workdir(str(smoke_workdir), runs=["nft_ng"])
  (run,) = wd.runs.values()
  assert run.name == "nft_ng" and run.done and run.lora and run.normguard and run.iteration == 3
  assert set(run.variables) == {"params", "lora"}
  x = jnp.zeros((2, 8, 8, 1))
  v_ref = dit.velocity(wd.ref_variables, x, jnp.ones(2), jnp.zeros(2, jnp.int32), cfg=wd.ref_model_cfg)
  assert np.all(np.isfinite(v_ref))


def test_loader_errors_are_clear(smoke_workdir, tmp_path):
  with pytest.raises(workdir_lib.WorkdirError, match="does not exist"):
    workdir_lib.load_workdir(str(tmp_path / "nope"))
  assert cli.main(["evaluate", "--workdir", str(tmp_path / "nope")]) == 2
  assert cli.main(["evaluate", "--workdir", "gs://bucket/run"]) == 2
  with pytest.raises(config_lib.ConfigError, match="gcsfuse"):
    from normguard_jax.train import loop
    loop.prepare_workdir("gs://bucket/run")
  copy = tmp_path / "w"
  shutil.copytree(smoke_workdir, copy, ignore=shutil.ignore_patterns("analysis", "eval"))
  ckpts = copy / "runs" / "nft_ng" / "checkpoints"
  last = max((p for p in ckpts.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  meta = json.loads((last / "meta" / "metadata").read_text())
  del meta["done"]  # as a periodic (not final) checkpoint
  (last / "meta" / "metadata").write_text(json.dumps(meta))
  with pytest.raises(workdir_lib.WorkdirError, match="unfinished"):
    workdir_lib.load_workdir(str(copy), runs=["nft_ng"])
  assert not workdir_lib.load_workdir(str(copy), runs=["nft_ng"], require_done=False).runs["nft_ng"].done
  for p in [p for p in ckpts.iterdir() if p.name.isdigit()]:
    shutil.rmtree(p)
  with pytest.raises(workdir_lib.WorkdirError, match="no finished checkpoint"):
    workdir_lib.load_workdir(str(copy), runs=["nft_ng"])


def test_cli_evaluate(smoke_workdir):
  assert cli.main(["evaluate", "--workdir", str(smoke_workdir), *RUNS, "--per-class", "1", "--steps", "2",
                   "--cfg-scale", "2"]) == 0
  res = _outputs(smoke_workdir / "analysis" / "evaluate", "evaluate.json", "evaluate.png", "evaluate_rho.png",
                 "evaluate_hinge.png")
  assert set(res["models"]) == {"reference", "nft_ng"}
  run = res["models"]["nft_ng"]
  assert {(e["num_steps"], e["cfg_scale"]) for e in run["settings"]} == {(2, 1.0), (2, 2.0)}
  for e in run["settings"]:
    assert len(e["own_rho_per_step"]) == len(e["reftraj_rho_per_step"]) == 2
    assert np.isfinite(e["reward"]) and "class_conf" in e and np.isfinite(e["own_inflation"])
  lam = [json.loads(l)["train/ng_lambda"] for l in (smoke_workdir / "runs" / "nft_ng" / "metrics.jsonl").read_text(
  ).splitlines() if "train/ng_lambda" in l]
  assert run["hinge"]["ng_active_frac"]["n"] == 3 and run["hinge"]["ng_lambda"]["last"] == pytest.approx(lam[-1])
  with np.load(smoke_workdir / "analysis" / "evaluate" / "samples" / "nft_ng.npz") as z:
    assert z["images"].shape == (10, 8, 8, 1) and list(z["labels"]) == list(range(10))
  ref = res["models"]["reference"]["settings"][0]
  np.testing.assert_allclose(ref["own_rho_per_step"], 1.0, rtol=1e-6)


def test_cli_rescale(smoke_workdir, tmp_path):
  out = tmp_path / "rescale"
  args = ["rescale", "--workdir", str(smoke_workdir), *RUNS, "--per-class", "4", "--steps", "2"]
  assert cli.main(args + ["--out", str(out)]) == 0
  res = _outputs(out, "rescale.json", "rescale.png")
  r = res["runs"]["nft_ng"]
  assert r["rescaled"]["max_abs_drive_rho_minus_1"] < 1e-5
  np.testing.assert_allclose(r["rescaled"]["drive_over_ref_per_step"], 1.0, rtol=1e-5)
  assert set(res["methods"]["nft"]) >= {"normguard", "normguard_rescaled", "summary"}
  # --shard: params placed by the rules table over the 8 test devices (fsdp=8), 40 rows split 8 ways; same numbers
  assert cli.main(args + ["--out", str(tmp_path / "sharded"), "--shard"]) == 0
  sharded = json.loads((tmp_path / "sharded" / "rescale.json").read_text())
  for variant in ("policy", "rescaled"):
    a, b = res["runs"]["nft_ng"][variant], sharded["runs"]["nft_ng"][variant]
    for key in ("reward", "mean_rho", "class_conf", "fid"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=f"{variant} {key}")


def test_cli_adjoint(smoke_workdir):
  assert cli.main(["adjoint", "--workdir", str(smoke_workdir), *RUNS, "--per-class", "1", "--steps", "2",
                   "--fd-steps", "1", "--fd-h", "0.01", "--no-reference"]) == 0
  res = _outputs(smoke_workdir / "analysis" / "adjoint", "adjoint.json", "adjoint.png")
  e = res["models"]["nft_ng"]
  assert np.asarray(e["g"]).shape == (2, 10) and len(e["per_step"]) == 2
  assert {"mean", "std", "sign_agreement", "p_t", "p_t_holm", "p_sign_holm"} <= set(e["per_step"][0])
  # fp32 central differences of a nearly untrained model's small derivative, through the learned reward's clip to
  # [-1, 1] (kinks a finite step can cross): agreement to a few percent; a wrong adjoint is off by O(1)
  assert e["fd_check"]["rel_error"] < 5e-2


def test_cli_compare(smoke_workdir, tmp_path):
  run = _torch_logs(tmp_path)
  out = tmp_path / "cmp"
  assert cli.main(["compare", "--workdir", str(smoke_workdir), *RUNS, "--torch", str(run), "--out", str(out)]) == 0
  res = _outputs(out, "compare.json", "compare.png")
  assert {"train/reward_mean", "train/kl_ref", "train/loss"} <= set(res["metrics"])
  assert res["metrics"]["train/reward_mean"]["ours"]["nft_ng"]["n"] == 3
  (src,) = res["sources"].values()
  assert "train/something_else" in src["unmapped"]
  assert cli.main(["compare", "--workdir", str(smoke_workdir), "--torch", str(tmp_path / "none")]) == 2
  # another of our runs made with other settings: compare names every setting that differs (issue 19)
  other = tmp_path / "other_run"
  shutil.copytree(smoke_workdir / "runs" / "nft_ng", other, ignore=shutil.ignore_patterns("checkpoints", "eval", "tb"))
  rec = json.loads((other / "recipe.json").read_text())
  assert rec["lora"]["modules"] > 0 and rec["grid"] == "linear" and rec["reference"]
  rec["grid"], rec["advantage"]["std"] = "diffusers", "group"
  (other / "recipe.json").write_text(json.dumps(rec))
  assert cli.main(["compare", "--workdir", str(smoke_workdir), *RUNS, "--torch", str(other), "--out",
                   str(tmp_path / "cmp2")]) == 0
  (diff,) = json.loads((tmp_path / "cmp2" / "compare.json").read_text())["recipe_differences"].values()
  assert diff == ["advantage.std: 'global' != 'group'", "grid: 'linear' != 'diffusers'"]


def test_loader_full_finetuning_checkpoint(smoke_workdir, tmp_path):
  """A full fine-tuning run's checkpoint (trainable = full params, frozen = reference), written with the layout of
  train/checkpoint.py: policy variables {"params": trainable}, reference {"params": frozen}."""
  import orbax.checkpoint as ocp
  ref = workdir_lib.load_workdir(str(smoke_workdir), runs=["nft_ng"]).ref_params
  cfg = json.loads((smoke_workdir / "config.json").read_text())
  cfg["rl"]["lora_rank"] = 0
  (tmp_path / "runs" / "nft_ng").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  trainable = jax.tree_util.tree_map(lambda a: a + 0.01, ref)
  state = {"step": jnp.int32(7), "trainable": trainable, "frozen": ref, "old": trainable,
           "opt_state": {"mu": trainable}, "rng": jax.random.PRNGKey(0)}
  mngr = ocp.CheckpointManager(str(tmp_path / "runs" / "nft_ng" / "checkpoints"), item_names=("state", "meta"))
  mngr.save(8, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
      {"done": True, "method": "nft", "normguard": True, "result": {"status": "ok"}})))
  mngr.wait_until_finished(); mngr.close()
  wd = workdir_lib.load_workdir(str(tmp_path))
  run = wd.runs["nft_ng"]
  assert not run.lora and set(run.variables) == {"params"} and run.iteration == 7 and run.model_cfg.lora_rank == 0
  for a, b in zip(jax.tree_util.tree_leaves(wd.ref_params), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(jax.tree_util.tree_leaves(run.variables["params"])[0],
                             jax.tree_util.tree_leaves(ref)[0] + 0.01, rtol=1e-6)
