"""Ahead-of-time compile of the sharded train step for a target topology, without its hardware
(MaxText's train_compile): catches shape, sharding and out-of-memory problems before a pod is booked.

    python -m normguard_jax.parallel.aot --topology v5p-128 --model sd35_medium --mesh data=1,fsdp=-1,tensor=1
    python -m normguard_jax.parallel.aot --topology cpu:8 --model tiny          # local simulated devices

A TPU topology needs libtpu in the environment (``pip install "jax[tpu]"``; it works on a CPU-only host).
Without it the tool says so and exits with status 2. Reports the per-device memory from
``compiled.memory_analysis()`` (arguments = sharded params, optimizer state, reference; temporaries = activations).
"""

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from normguard_jax.models import dit, mmdit
from normguard_jax.parallel import mesh as mesh_lib, rules, sharding
from normguard_jax.rl import normguard as ng
from normguard_jax.train import state as state_lib, step as step_lib

PRESETS = {
    # diffusers stabilityai/stable-diffusion-3.5-medium transformer/config.json
    "sd35_medium": dict(kind="mmdit", cfg=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                               attention_head_dim=64, num_attention_heads=24,
                                               joint_attention_dim=4096, caption_projection_dim=1536,
                                               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "sd35_large": dict(kind="mmdit", cfg=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                              attention_head_dim=64, num_attention_heads=38,
                                              joint_attention_dim=4096, caption_projection_dim=2432,
                                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                                              qk_norm="rms_norm")),
    "tiny": dict(kind="dit", cfg=dict(image_size=8, channels=1, patch_size=2, width=64, depth=4, num_heads=4)),
}


def tpu_topology_name(name):
  """'v5p-128' (cores, as gcloud names slices) -> libtpu's 'v5p:4x4x4' (chips). Passes libtpu names through."""
  import re
  if re.match(r"^[a-zA-Z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?$", name):
    return name
  m = re.match(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$", name)
  if not m:
    raise SystemExit(f"--topology {name!r}: expected e.g. v5p-128, v5e-256, v6e-64, v4-32, or a libtpu name "
                     "like v5p:4x4x4")
  gen, n = m.group(1), int(m.group(2))
  three_d = gen in ("v4", "v5p")
  chips = n // 2 if three_d else n  # v4 / v5p names count TensorCores (2 per chip)
  dims = [1, 1, 1] if three_d else [1, 1]
  while int(np.prod(dims)) < chips:
    dims[dims.index(min(dims))] *= 2
  if int(np.prod(dims)) != chips:
    raise SystemExit(f"--topology {name!r}: {chips} chips is not a power-of-two slice")
  dims = sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]
  return f"{'v5e' if gen == 'v5litepod' else gen}:{'x'.join(map(str, dims))}"


def topology_devices(topology):
  if topology.startswith("cpu:"):
    n = int(topology.split(":", 1)[1])
    if len(jax.devices("cpu")) < n:
      raise SystemExit(f"--topology {topology}: only {len(jax.devices('cpu'))} CPU devices; set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return jax.devices("cpu")[:n]
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology_name=tpu_topology_name(topology), platform="tpu").devices
  except Exception as e:  # no libtpu, or a name this libtpu does not know
    print(f"error: cannot describe TPU topology {topology!r} with the installed JAX {jax.__version__} "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). AOT compilation for TPU needs libtpu: "
          f"pip install 'jax[tpu]' (works on a CPU-only host), then rerun.", file=sys.stderr)
    raise SystemExit(2)


def build(model, batch, resolution, text_len, lora_rank, remat, dtype):
  preset = PRESETS[model]
  if preset["kind"] == "mmdit":
    cfg = mmdit.MMDiTConfig(**preset["cfg"], lora_rank=lora_rank, lora_alpha=2.0 * max(lora_rank, 1),
                            remat=remat, dtype=dtype,
                            lora_targets=("to_q", "to_k", "to_v", "to_out") if lora_rank else mmdit.LORA_TARGETS)
    lat = resolution // 8
    x = jax.ShapeDtypeStruct((batch, lat, lat, cfg.in_channels), jnp.float32)
    cond = {"prompt_embeds": jax.ShapeDtypeStruct((batch, text_len, cfg.joint_attention_dim), jnp.float32),
            "pooled": jax.ShapeDtypeStruct((batch, cfg.pooled_projection_dim), jnp.float32)}
    apply_fn = lambda v, x_, t, c, g: mmdit.velocity(v, x_, t, c, cfg=cfg, lora_gate=g)
    init = lambda: mmdit.init(cfg, jax.random.PRNGKey(0))
  else:
    cfg = dit.DiTConfig(**preset["cfg"], lora_rank=lora_rank, lora_alpha=2.0 * max(lora_rank, 1), dtype=dtype)
    x = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    cond = jax.ShapeDtypeStruct((batch,), jnp.int32)
    apply_fn = lambda v, x_, t, c, g: dit.velocity(v, x_, t, c, cfg=cfg, lora_gate=g)
    init = lambda: dit.init(cfg, jax.random.PRNGKey(0))
  vec = jax.ShapeDtypeStruct((batch,), jnp.float32)
  batch_abs = {"x0": x, "eps": x, "x_t": x, "t": vec, "adv": vec, "cond": cond}
  return cfg, apply_fn, init, batch_abs


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.parallel.aot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", required=True, help="TPU topology name (v5p-128, v5e-256, v6e-64, ...) or cpu:N")
  p.add_argument("--model", default="sd35_medium", choices=sorted(PRESETS))
  p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
  p.add_argument("--batch", type=int, default=0, help="global batch (default: 1 per device)")
  p.add_argument("--resolution", type=int, default=512)
  p.add_argument("--text-len", type=int, default=333, help="77 CLIP + 256 T5 tokens")
  p.add_argument("--lora-rank", type=int, default=32, help="0 = full fine-tuning (reference params in the state)")
  p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
  p.add_argument("--dtype", default="bfloat16")
  a = p.parse_args(argv)

  devices = topology_devices(a.topology)
  sizes = dict(kv.split("=") for kv in a.mesh.split(","))
  mesh_cfg = ml_collections.ConfigDict({k: int(v) for k, v in sizes.items()})
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  batch = a.batch or len(devices)
  cfg, apply_fn, init, batch_abs = build(a.model, batch, a.resolution, a.text_len, a.lora_rank, a.remat, a.dtype)
  lora = a.lora_rank > 0
  tx = optax.chain(ng.normguard_lambda("constant", 1.0), optax.clip_by_global_norm(1.0), optax.adamw(1e-4))

  def init_state():
    variables = init()
    trainable = variables["lora"] if lora else variables["params"]
    return state_lib.create(trainable, variables["params"], tx, jax.random.PRNGKey(1), lora=lora, with_old=True)

  notes = []
  abstract = jax.eval_shape(init_state)
  state_sh = rules.tree_shardings(abstract, mesh, notes)
  batch_sh = sharding.batch_shardings(batch_abs, mesh)
  loss_cfg = ml_collections.ConfigDict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0))
  ng_cfg = ml_collections.ConfigDict(dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0))
  step = jax.jit(functools.partial(step_lib.train_step, method="nft", apply_fn=apply_fn, optimizer=tx,
                                   loss_cfg=loss_cfg, ng_cfg=ng_cfg),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  compiled = step.lower(abstract, batch_abs).compile()
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  memory = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem is not None else {}
  if memory:
    memory["peak_estimate_bytes"] = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                                     - memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"])
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.frozen))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.trainable))
  out = {"topology": a.topology, "devices": len(devices), "device_kind": str(devices[0].device_kind),
         "mesh": dict(mesh.shape), "model": a.model, "params": n_params, "trainable": n_train,
         "global_batch": batch, "resolution": a.resolution, "lora_rank": a.lora_rank, "remat": a.remat,
         "dtype": a.dtype, "per_device_memory": memory,
         "per_device_memory_gib": {k: round(v / 2 ** 30, 3) for k, v in memory.items()},
         "replicated_dims": sorted(set(notes))}
  print(json.dumps(out, indent=2))
  return out


if __name__ == "__main__":
  main()
