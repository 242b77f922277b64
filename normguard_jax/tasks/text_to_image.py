"""Shared text-to-image task logic (SD3 and FLUX): prompt embeddings from the offline tfds dataset, fixed eval
prompts, CFG from a ``negative`` split, VAE decoding in chunks, sample grids. Family specifics (the converter, the
velocity model, the conditioning dict, the VAE) live in tasks/sd3.py and tasks/flux.py.

Everything comes from local files named in the config; nothing is downloaded:
  * ``model.weights_dir``: a diffusers pipeline snapshot (``transformer/`` and ``vae/``), converted on load by the
    strict converters; the transformer is the frozen reference.
  * ``data.embeddings_dir``: prompt embeddings written by ``python -m normguard_jax.data.encode_prompts`` (tfds
    array_record); the trainer never runs a text encoder. Each example carries its prompt text, which prompt-aware
    rewards (PickScore, remote judges) receive. CFG (``rollout.cfg_scale`` != 1) needs the negative prompt (usually
    "") encoded the same way, as split ``data.negative_split`` of ``data.negative_dir`` (a separate encode_prompts
    output; default: the embeddings dir itself).
"""

import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import config as config_lib
from normguard_jax.convert import vae as vae_convert
from normguard_jax.data import text_embeddings
from normguard_jax.flow import schedules

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("decode_fn", "vae_cfg"))
def _decode_jit(params, z, *, decode_fn, vae_cfg):
  """One compile per (decoder, VAE config, shape) in the process, shared by every task instance."""
  return decode_fn(params, z, vae_cfg)


@functools.lru_cache(maxsize=8)
def sharded_decode_program(decode_fn, vae_cfg, mesh, per_chip=0):
  """The VAE decode on a mesh, traced under the activation mesh: the latent rows (n, ...) split over the batch axes
  ('data', 'fsdp'), params replicated, pixels out split the same way. Each chip decodes only its own n / ways rows,
  ``per_chip`` at a time (a ``lax.map`` over local chunks: no communication; 0 = all at once). A plain jit of a
  sliced global array would decode every row on every chip."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from normguard_jax.parallel import rules, sharding as sharding_lib
  batch_axes = rules.batch_sharding(mesh, 1).spec[0]
  ways = sharding_lib.batch_size_divisor(mesh)

  def decode(params, z):
    with rules.activation_mesh(mesh):
      local = z.shape[0] // ways
      c = max(d for d in range(1, (per_chip or local) + 1) if local % d == 0)  # rows per chip per map step
      zz = z.reshape((ways, local // c, c) + z.shape[1:])  # chip d's rows are zz[d]: the rows' contiguous layout
      zz = jax.lax.with_sharding_constraint(jnp.moveaxis(zz, 1, 0), NamedSharding(mesh, P(None, batch_axes)))

      def step(zc):  # (ways, c, ...) -> pixels, every chip on its own c rows
        x = decode_fn(params, zc.reshape((ways * c,) + zc.shape[2:]), vae_cfg)
        return jax.lax.with_sharding_constraint(x.reshape((ways, c) + x.shape[1:]),
                                                NamedSharding(mesh, P(batch_axes)))
      out = jax.lax.map(step, zz)  # (local / c, ways, c, H, W, C)
      return jnp.moveaxis(out, 0, 1).reshape((z.shape[0],) + out.shape[3:])
  return jax.jit(decode, out_shardings=NamedSharding(mesh, P(batch_axes)))


class TextToImageTask:
  quality_labels = {}  # no proxies in the trainer: held-out evaluation is normguard_jax.analysis's job

  def __init__(self, cfg, text_len=None):
    """``text_len``: build the task without data (no embeddings are opened; :meth:`cond_spec` gives the shapes of
    ``text_len`` text tokens), for the ahead-of-time compilation of a recipe (parallel/aot.py)."""
    self.cfg = cfg
    self.text_len = text_len
    self._negative = None
    self._vae_params = None
    self._decode_mesh = None  # use_mesh: decode with rows split over this mesh
    if text_len is not None:
      self.data = self.eval_data = self.held_out = None
      return
    d = cfg.data
    self.data = self._open(d.embeddings_dir, d.split, "data.embeddings_dir")
    self.held_out, self.eval_source = self._eval_source()
    self.eval_data = self.data if not self.held_out else self._open(*self.eval_source, "data.eval_embeddings_dir")
    if cfg.rollout.cfg_scale != 1.0:
      self._load_negative()  # fail at start-up, not at the first CFG rollout

  def _snapshot_dir(self):
    """The diffusers snapshot named by ``model.weights_dir``, checked before anything loads: ``transformer/`` and
    ``vae/`` with their config.json. A path to the snapshot's ``transformer/`` folder is accepted (its parent is the
    snapshot); anything else is a ConfigError naming the layout."""
    path = os.path.abspath(os.path.expanduser(self.cfg.model.weights_dir))
    has = lambda d, c: os.path.isfile(os.path.join(d, c, "config.json"))
    if not has(path, "transformer") and os.path.isfile(os.path.join(path, "config.json")) and has(
        os.path.dirname(path), "transformer") and os.path.basename(path) == "transformer":
      log.info("model.weights_dir %s is the snapshot's transformer/ folder; using the snapshot %s", path,
               os.path.dirname(path))
      path = os.path.dirname(path)
    missing = [c for c in ("transformer", "vae") if not has(path, c)]
    if missing:
      raise config_lib.ConfigError(
          f"config.model.weights_dir: {path} is not a diffusers pipeline snapshot: no {' or '.join(missing)}/ with a "
          "config.json (expected SNAP/transformer/ and SNAP/vae/, as `save_pretrained` or a Hugging Face snapshot "
          "lays them out; pass the snapshot's top folder)")
    return path

  def _component(self, component, class_names):
    from normguard_jax.convert.safetensors_io import ConversionError, resolve_component_dir
    try:
      return resolve_component_dir(self._snapshot_dir(), component, class_names)
    except ConversionError as e:
      raise config_lib.ConfigError(f"config.model.weights_dir: {component}/: {e}") from e

  def _open(self, directory, split, field):
    try:
      source = text_embeddings.load_text_embeddings(directory, split)
    except text_embeddings.NotTextEmbeddingsError as e:
      raise config_lib.ConfigError(f"config.{field}: {e}") from e
    except (KeyError, ValueError) as e:
      have = sorted(text_embeddings.splits(directory))
      raise config_lib.ConfigError(f"config.{field}: {directory} has no split {split!r} (it has {have}); add one "
                                   f"with `encode_prompts PIPELINE PROMPTS {directory} --split {split}`") from e
    want = int(self.cfg.data.get("max_sequence_length", 0) or 0)
    have_len = text_embeddings.describe(directory)["metadata"].get("max_sequence_length")
    if want and have_len is not None and int(have_len) != want:
      raise config_lib.ConfigError(
          f"config.{field}: {directory} was encoded with max_sequence_length {have_len}, the recipe's reference uses "
          f"{want} (data.max_sequence_length); encode with --max-sequence-length {want}, or set "
          f"--config.data.max_sequence_length=0 to accept it")
    return source

  def _eval_source(self):
    """Held-out eval prompts (issue 15): ``data.eval_split`` of ``data.eval_embeddings_dir`` (default: the embeddings
    dir) when set; else a ``test`` split there when one exists; else the training prompts, said loudly (the report
    records ``held_out_prompts``). Returns (held_out, (directory, split))."""
    d = self.cfg.data
    directory = d.get("eval_embeddings_dir", "") or d.embeddings_dir
    split = d.eval_split or ("test" if "test" in text_embeddings.splits(directory) and (
        directory != d.embeddings_dir or d.split != "test") else "")
    if split and (directory, split) != (d.embeddings_dir, d.split):
      return True, (directory, split)
    log.warning("eval prompts are TRAINING prompts (no held-out split): eval reward measures fitting, not "
                "generalisation. Add one with `encode_prompts PIPELINE test_prompts.txt %s --split test` (used "
                "automatically) or pass --config.data.eval_embeddings_dir / --config.data.eval_split", directory)
    return False, (d.embeddings_dir, d.split)

  def _load_negative(self):
    """The negative prompt's example (split ``data.negative_split`` of ``data.negative_dir``), loaded once."""
    if self._negative is None:
      d = self.cfg.data
      neg_dir = d.get("negative_dir", "") or d.embeddings_dir
      try:
        neg = text_embeddings.load_text_embeddings(neg_dir, d.negative_split)
      except (KeyError, FileNotFoundError, ValueError) as e:
        raise config_lib.ConfigError(
            f"config.rollout.cfg_scale: CFG needs the negative prompt's embeddings as split {d.negative_split!r} in "
            f"{neg_dir} ({e}); write them with `encode_prompts PIPELINE negative.jsonl NEG_DIR --split "
            f"{d.negative_split}` (negative.jsonl: the line {{\"prompt\": \"\"}}) and pass "
            "--config.data.negative_dir=NEG_DIR") from e
      self._negative = neg[0]
    return self._negative

  def cfg_available(self):
    """Whether CFG can run (the negative prompt's embeddings are on disk); used by the analysis commands."""
    try:
      self._load_negative()
      return True
    except config_lib.ConfigError:
      return False

  def load_decoder(self):
    """Load the VAE params once (also done by :meth:`reference`); the analysis commands need the decoder but not
    the transformer, which the checkpoints hold."""
    if self._vae_params is None:
      m = self.cfg.model
      _, self._vae_params = vae_convert.load_vae(self._vae_dir, param_dtype=np.dtype(jnp.dtype(m.param_dtype)),
                                                 dtype=m.dtype)
    return self._vae_params

  def _decode(self, params, z):
    return _decode_jit(params, z, decode_fn=self.vae_decode, vae_cfg=self.vae_cfg)

  def _decode_fn(self, params, z):
    return self.vae_decode(params, z, self.vae_cfg)

  def place_decoder(self, sharding):
    """Put the VAE params on ``sharding`` (replicated over the analysis mesh)."""
    self._vae_params = jax.device_put(self.load_decoder(), sharding)

  def use_mesh(self, mesh):
    """Decode on ``mesh`` from now on (:func:`sharded_decode_program`), the VAE params replicated over it."""
    self._decode_mesh = mesh
    self.place_decoder(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def decoder(self):
    """-> (decode_fn(params, z) -> pixels, params): the VAE decoder as a pure function (differentiable, for the
    adjoint analysis) and its params."""
    return self._decode_fn, self.load_decoder()

  # ---------------------------------------------------------------- family hooks (see sd3.py, flux.py)
  model_module = None  # models/mmdit.py or models/flux.py: velocity(...), init_lora(cfg, key)
  base_cfg = None      # the transformer's config from its config.json (plus runtime fields)

  def cond_from_examples(self, examples):
    """Dataset examples -> the family's conditioning dict (defined by tasks/sd3.py and tasks/flux.py)."""
    raise TypeError(f"{type(self).__name__} must define cond_from_examples")

  # ---------------------------------------------------------------- the task interface (tasks/__init__.py)
  def model_config(self, lora_rank=0):
    rl = self.cfg.rl
    return dataclasses.replace(self.base_cfg, lora_rank=lora_rank, lora_alpha=float(rl.lora_alpha),
                               lora_targets=tuple(config_lib.csv(rl.lora_targets)))

  def apply_fn(self, model_cfg):
    velocity = self.model_module.velocity

    def apply_fn(variables, x, t, cond, gate):
      return velocity(variables, x, t, cond, cfg=model_cfg, lora_gate=gate)
    return apply_fn

  def init_lora(self, model_cfg, key):
    return self.model_module.init_lora(model_cfg, key)

  def sampling_grid(self, num_steps, resolution=0):
    """The sampling grid (rollouts, eval, analysis, training timesteps): ``rollout.grid`` kind with the static
    ``rollout.shift`` (SD3; FLUX overrides it with its resolution-dependent mu)."""
    del resolution
    r = self.cfg.rollout
    return np.asarray(schedules.sampling_grid(int(num_steps), float(r.shift), kind=r.get("grid", "linear")))

  def _stack(self, examples):
    return self.cond_from_examples(examples), [e["prompt"] for e in examples]

  def sample_prompts(self, key, n):
    """n prompts drawn uniformly (with replacement only when the set is smaller than n), from the key alone:
    the data position is the iteration, so a resumed run draws the same prompts."""
    size = len(self.data)
    idx = np.asarray(jax.random.choice(key, size, (n,), replace=n > size))
    return self._stack(self.data.__getitems__(idx.tolist()))

  def uncond(self, cond):
    """The negative prompt's conditioning, one row per row of ``cond``."""
    rows = jax.tree_util.tree_leaves(cond)[0].shape[0]
    neg = self.cond_from_examples([self._load_negative()])
    return jax.tree_util.tree_map(lambda a: np.repeat(a, rows, axis=0), neg)

  def decode(self, latents):
    """Latents -> pixels in [-1, 1], in chunks of ``model.decode_batch`` rows per chip (VAE activations are large).

    On a mesh (:meth:`use_mesh`) the rows are split over its batch axes, each chip decoding only its own; row
    counts the batch axes do not divide (never the loop's: config.check_batch_layout) decode on every chip."""
    params = self.load_decoder()
    mesh = getattr(self, "_decode_mesh", None)
    per_call = int(self.cfg.model.decode_batch)
    n = latents.shape[0]
    if mesh is not None and mesh.size > 1:
      from normguard_jax.parallel import sharding as sharding_lib
      if n % sharding_lib.batch_size_divisor(mesh) == 0:
        return sharded_decode_program(self.vae_decode, self.vae_cfg, mesh, per_call)(params, latents)
    n, chunk = latents.shape[0], per_call or latents.shape[0]
    if n <= chunk:
      return self._decode(params, latents)
    return jnp.concatenate([self._decode(params, latents[i:i + chunk]) for i in range(0, n, chunk)])

  def eval_set(self):
    n = min(int(self.cfg.eval.num_prompts), len(self.eval_data))
    return self._stack(self.eval_data.__getitems__(list(range(n))))

  def eval_conditions(self):
    """The distinct held-out conditions for the analysis commands: the eval prompts."""
    return self.eval_set()

  @staticmethod
  def quality(images, cond):
    del images, cond
    return {}

  @staticmethod
  def quality_per_sample(images, cond):
    del images, cond
    return {}

  @staticmethod
  def quality_aggregate(per_sample):
    del per_sample
    return {}

  @staticmethod
  def quality_set_stats():
    return {}

  @staticmethod
  def real_quality(cond):
    del cond
    return {}

  def cond_spec(self, rows):
    """Abstract conditioning of ``rows`` rows (ShapeDtypeStructs) for ahead-of-time compilation: a dataset example's
    shapes, or ``text_len`` tokens for a task built without data."""
    import jax
    if self.text_len is not None:
      example = self.abstract_example(self.text_len)
    else:
      example = {k: np.zeros(v, np.float32) for k, v in (("prompt_embeds", self.data.prompt_embeds_shape),
                                                          ("pooled", self.data.pooled_shape))}
      example["prompt"] = ""
    cond = self.cond_from_examples([example])
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((rows,) + a.shape[1:], a.dtype), cond)

  def _check_embeddings(self, embed_dim, pooled_dim=None):
    if self.text_len is not None:
      return
    _, d = self.data.prompt_embeds_shape
    ok = d == embed_dim and (pooled_dim is None or self.data.pooled_shape == (pooled_dim,))
    if not ok:
      raise config_lib.ConfigError(
          f"config.data.embeddings_dir: embeddings {self.data.prompt_embeds_shape} / pooled {self.data.pooled_shape} "
          f"do not fit the transformer (text width {embed_dim}, pooled {pooled_dim}); encode the prompts with this "
          "model's text encoders")

  def _check_latents(self, factor, patch, latent_channels, vae_channels, max_grid=None):
    m = self.cfg.model
    if latent_channels != vae_channels:
      raise config_lib.ConfigError(f"{m.weights_dir}: the VAE has {vae_channels} latent channels but the "
                                   f"transformer takes {latent_channels}")
    self._latent = (factor, patch, latent_channels, max_grid)
    self.latent_shape = self.latent_shape_at(m.resolution, "model.resolution")
    if self.cfg.eval.get("resolution", 0):
      self.latent_shape_at(self.cfg.eval.resolution, "eval.resolution")

  def latent_shape_at(self, resolution, field="model.resolution"):
    """Latent (H, W, C) of images of ``resolution`` pixels; a ConfigError naming ``field`` when the model cannot
    take that size (a multiple of the VAE factor x patch size, within SD3's pos_embed_max_size)."""
    factor, patch, channels, max_grid = self._latent
    resolution = int(resolution) or int(self.cfg.model.resolution)
    if resolution <= 0 or resolution % (factor * patch):
      raise config_lib.ConfigError(f"config.{field}: {resolution} is not a positive multiple of {factor * patch} "
                                   "(VAE factor x patch size)")
    if max_grid is not None and resolution // (factor * patch) > max_grid:
      raise config_lib.ConfigError(
          f"config.{field}: {resolution} px is a {resolution // (factor * patch)}-token grid per side, beyond the "
          f"transformer's pos_embed_max_size {max_grid} (at most {max_grid * factor * patch} px)")
    return (resolution // factor, resolution // factor, channels)

  def sample_grid(self, images, cond, prompts, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    del cond
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)[: self.cfg.eval.grid_images]
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
      ax.axis("off")
      if i < len(images):
        ax.imshow(images[i])
        if prompts is not None:
          ax.set_title(prompts[i][:40], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
