"""The accelerator benchmark (normguard_jax/bench_suite.py) runs end to end at its small preset on CPU: JAX and
PyTorch train steps, rollouts, the JSON and the table. No timing is asserted; the numbers it compares are."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from normguard_jax import bench_suite  # noqa: E402


def test_bench_suite_small_preset_end_to_end(tmp_path, capsys):
  out = tmp_path / "bench.json"
  res = bench_suite.main(["--preset", "small", "--iters", "1", "--warmup", "1", "--rollout-iters", "1",
                          "--out", str(out)])
  assert json.loads(out.read_text())["preset"] == "small"
  assert res["attention"] == {"asked": "auto", "resolved": "xla"}  # CPU, short sequence
  for side in ("jax", "torch"):
    assert res["train"][side]["step_s"] > 0 and res["rollout"][side]["images_per_s"] > 0
  # the same weights, batch and step in both frameworks (bf16 compute on both sides)
  assert res["velocity_rel_l2_bf16"] < 0.05, res["velocity_rel_l2_bf16"]
  assert res["rollout"]["final_latent_rel_l2_bf16"] < 0.05, res["rollout"]["final_latent_rel_l2_bf16"]
  assert res["train"]["first_loss_abs_diff"] < 0.05 * abs(res["train"]["jax"]["first_loss"])
  assert res["model_flops_step"] > 0 and res["train"]["jax"]["mfu"] is None  # no peak known for a CPU
  assert "PyTorch / JAX" in capsys.readouterr().out
