"""LoRA dense layer with a per-row, per-adapter gate.

y = x W + b + (alpha / r) * sum_j gate[row, j] * (x A_j) B_j.

Adapters are stacked on the last axis of the ``lora`` leaves (A: (in, r, J), B: (r, out, J)), so that
stacking works the same whether or not layers are scanned. One batched forward
can serve policy rows (gate = [1, 0]), old-policy rows ([0, 1]) and reference rows ([0, 0]) with the
base weights shared (DESIGN.md §3, "Velocities"). Gate 0 gives the base model exactly: the delta is
multiplied by an exact zero. B is initialised to zero, so a fresh adapter is the base model too.
"""

import flax.linen as nn
import jax.numpy as jnp


class LoRADense(nn.Module):
  features: int
  lora_rank: int = 0
  lora_alpha: float = 1.0
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, lora_gate=None):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = jnp.dot(x, kernel.astype(x.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
    if self.lora_rank <= 0:
      return y
    a = self.variable("lora", "lora_a",
                      lambda: nn.initializers.normal(1.0 / self.lora_rank)(
                          self.make_rng("params"), (x.shape[-1], self.lora_rank, 1))).value
    b = self.variable("lora", "lora_b", lambda: jnp.zeros((self.lora_rank, self.features, 1))).value
    num_adapters = a.shape[-1]
    if lora_gate is None:  # policy only: first adapter on every row
      lora_gate = jnp.zeros((x.shape[0], num_adapters), x.dtype).at[:, 0].set(1)
    # Every adapter's down-projection (..., r, J), gated per row, summed over (r, J) in the up-projection:
    # a single LoRA of rank r * J whose rank components are switched per row.
    h = jnp.einsum("...i,irj->...rj", x, a.astype(x.dtype))
    gate = lora_gate.astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (1, num_adapters))
    delta = jnp.einsum("...rj,roj->...o", h * gate, b.astype(x.dtype))
    return y + (self.lora_alpha / self.lora_rank) * delta


# ----------------------------------------------------------------------------------------------- targets
#
# ``lora_targets`` reads like PEFT's ``LoraConfig(target_modules=[...])``: each entry is a dotted suffix of a
# diffusers module path, and a Linear is adapted when its path equals an entry or ends with "." + the entry
# (peft/tuners/tuners_utils.py ``check_target_module_exists``). So "attn.to_q" is the joint attention's query
# projection only, "attn2.to_q" the SD3.5 dual attention's, and "to_q" both; a reference's list can be stated
# verbatim. Sites are named by their path inside one block (``attn.to_out.0``, ``ff.net.0.proj``); entries never
# name a layer index (a scanned group shares one structure). One extension keeps older configs' meaning: an entry
# naming the ``to_out`` ModuleList (``to_out``, ``attn.to_out``) adapts its Linear ``to_out.0``, where PEFT would
# refuse the ModuleList.

_CONTAINER_ALIASES = ((".to_out.0", ".to_out"),)  # site suffix -> also answers to this (our older plain names)


def _names(site):
  """The names a site answers to: its diffusers path, plus the container alias for ``to_out.0``."""
  out = [site]
  for suffix, alias in _CONTAINER_ALIASES:
    if ("." + site).endswith(suffix):
      out.append(site[:len(site) - len(suffix) + len(alias)])
  return out


def _suffix_match(target, name):
  return name == target or name.endswith("." + target)


def target_matches(targets, site) -> bool:
  """Whether the site (a module path inside a block, e.g. ``attn2.to_q``) is adapted under ``targets``."""
  return any(_suffix_match(t, n) for t in targets for n in _names(site))


def target_vocabulary(sites, others=()):
  """Every accepted ``lora_targets`` entry for a model whose LoRA sites are ``sites``: the dotted suffixes of each
  site (and of its alias) that do not start at an index, minus those that PEFT would also match on a module we do not
  adapt (``others``: the model's other Linear / Conv paths, e.g. ``pos_embed.proj`` rules out ``proj``)."""
  vocab = set()
  for site in sites:
    for name in _names(site):
      parts = name.split(".")
      vocab.update(".".join(parts[i:]) for i in range(len(parts)) if not parts[i].isdigit())
  return tuple(sorted(t for t in vocab if not any(_suffix_match(t, o) for o in others)))


def check_targets(targets, vocabulary, presets, family):
  """ValueError naming the entries of ``targets`` that are not in ``vocabulary``."""
  bad = [t for t in targets if t not in vocabulary]
  if bad:
    hint = ("; entries name modules inside a block, never a layer index" if any(
        any(p.isdigit() for p in t.split(".")[:-1]) or "blocks" in t for t in bad) else "")
    raise ValueError(f"{family}: unknown lora_targets {bad}{hint}. Entries are PEFT target_modules suffixes of "
                     f"diffusers module names (presets: {dict(presets)}); accepted: {list(vocabulary)}")
