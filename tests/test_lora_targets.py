"""LoRA targets (models/lora.py "targets", mmdit / flux LORA_TARGETS and LORA_PRESETS) against PEFT itself.

Our ``lora_targets`` entries read like PEFT's ``LoraConfig(target_modules=[...])``. For each family (a tiny SD3.5-style
transformer with dual attention, a tiny FLUX.1 and a tiny FLUX.2-klein, random-init diffusers models), PEFT's
``inject_adapter_in_model`` must select exactly the modules our ``lora_modules(cfg)`` lists:
  * every reference preset, with the same parameter count as our model's ``lora`` tree (by ``jax.eval_shape``);
  * every accepted entry on its own. Entries naming the ``to_out`` ModuleList (our older plain names), which PEFT
    refuses, select its Linear ``to_out.0`` (and FLUX.2's plain single-block ``to_out``).
At the real SD3.5-Medium size the reference list gives 191 modules / 18.78 M parameters at r32 and our earlier default
243 / 23.89 M (recipe_fidelity.md Table 1 row 22), counted by ``jax.eval_shape`` without allocating.
"""

import copy

import jax
import pytest

from normguard_jax.convert import flux as convert_flux
from normguard_jax.convert import sd3 as convert_sd3
from normguard_jax.models import flux, mmdit

torch = diffusers = peft = None  # the PEFT oracles, imported by the fixture (the pure-JAX tests run without them)

R = 4
SD35 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
FLUX1 = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
             guidance_embeds=True)
FLUX2 = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
             axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
# family: (diffusers class, kwargs, our model module, converter, accepted entries, presets)
FAMILIES = {
    "sd35": ("SD3Transformer2DModel", SD35, mmdit, convert_sd3, mmdit.LORA_TARGETS, mmdit.LORA_PRESETS),
    "flux1": ("FluxTransformer2DModel", FLUX1, flux, convert_flux, flux.FLUX1_LORA_TARGETS, flux.FLUX1_LORA_PRESETS),
    "flux2_klein": ("Flux2Transformer2DModel", FLUX2, flux, convert_flux, flux.FLUX2_LORA_TARGETS,
                    flux.FLUX2_LORA_PRESETS),
}
# (family, preset): adapted modules of the tiny models
EXPECTED = {("sd35", "reference"): 31, ("sd35", "all_attention"): 39, ("flux1", "reference"): 30,
            ("flux1", "all_attention"): 22, ("flux2_klein", "reference"): 26, ("flux2_klein", "all_attention"): 20}


@pytest.fixture(scope="module")
def torch_models():
  global torch, diffusers, peft
  torch, diffusers, peft = (pytest.importorskip(m) for m in ("torch", "diffusers", "peft"))
  return {name: getattr(diffusers, cls)(**kwargs) for name, (cls, kwargs, *_) in FAMILIES.items()}


def _our_cfg(family, model, targets):
  cls, _, _, converter, *_ = FAMILIES[family]
  return converter.config_from_diffusers(dict(model.config, _class_name=cls), lora_rank=R, lora_alpha=2.0 * R,
                                         lora_targets=tuple(targets))


def _peft(model, targets):
  """(adapted module names, LoRA parameter count) when PEFT applies ``targets`` to a copy of ``model``."""
  targets = targets if isinstance(targets, str) else list(targets)  # a str is a regex for PEFT
  m = peft.inject_adapter_in_model(peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets),
                                   copy.deepcopy(model))
  names = sorted(n[:-len(".lora_A.default")] for n, _ in m.named_modules() if n.endswith(".lora_A.default"))
  return names, sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family,preset", sorted(EXPECTED))
def test_presets_select_what_peft_selects(torch_models, family, preset):
  model = torch_models[family]
  module, presets = FAMILIES[family][2], FAMILIES[family][5]
  targets = presets[preset]
  cfg = _our_cfg(family, model, targets)
  ours = sorted(m for m, _, _ in module.lora_modules(cfg))
  # PEFT refuses the to_out ModuleList our older plain names accept: state those as PEFT suffixes of the same Linears
  peft_targets = [t + ".0" if t in ("to_out", "attn.to_out") else t for t in targets]
  if family == "flux2_klein" and preset == "all_attention":  # plus the single blocks' plain to_out: a PEFT regex
    peft_targets = (r"(.*\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj|to_out\.0)"
                    r"|single_transformer_blocks\.\d+\.attn\.to_out)")
  names, n_params = _peft(model, peft_targets)
  shapes = module.param_shapes(cfg)["lora"]
  tree_modules = {"/".join(str(getattr(k, "key", k)) for k in p[:-1])
                  for p, _ in jax.tree_util.tree_leaves_with_path(shapes)}
  print(f"[lora targets] {family} {preset}: ours {len(ours)} modules / {module.param_count(shapes)} params, "
        f"PEFT {len(names)} / {n_params}")
  assert ours == names and len(ours) == EXPECTED[(family, preset)]
  assert module.param_count(shapes) == n_params
  # the model's lora tree holds exactly the listed sites (our scanned paths)
  assert tree_modules == {"/".join(path) for _, path, _ in module.lora_modules(cfg)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_entry_selects_what_peft_selects(torch_models, family):
  model = torch_models[family]
  module, vocabulary = FAMILIES[family][2], FAMILIES[family][4]
  linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
  refused = []
  for entry in vocabulary:
    ours = sorted(m for m, _, _ in module.lora_modules(_our_cfg(family, model, [entry])))
    try:
      names, _ = _peft(model, [entry])
    except ValueError as e:  # the to_out ModuleList: our entry means its Linear to_out.0 (+ plain to_out Linears)
      assert "ModuleList" in str(e), (entry, e)
      refused.append(entry)
      names = sorted(set(_peft(model, [entry + ".0"])[0]) | {n for n in linears if n.endswith("." + entry)})
    assert ours == names, (entry, ours, names)
    assert ours, entry  # every accepted entry adapts something
  assert sorted(refused) == [t for t in ("attn.to_out", "attn2.to_out", "to_out") if t in vocabulary]


def test_sd35_medium_reference_counts_by_eval_shape():
  """SD3.5-Medium (transformer/config.json of stabilityai/stable-diffusion-3.5-medium) at r32: the references' list
  191 modules / 18,776,064 params; our earlier default 243 / 23,887,872 (recipe_fidelity.md Table 1 row 22). The
  model's pos_embed_max_size (384) is reduced to 64: init builds that sin-cos table eagerly in numpy (384^2 x 1536
  float64 = 1.8 GB), and it has nothing to do with the LoRA shapes."""
  medium = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=64, qk_norm="rms_norm",
                dual_attention_layers=tuple(range(13)))
  for preset, (n_modules, n_params) in (("reference", (191, 18_776_064)), ("all_attention", (243, 23_887_872))):
    cfg = mmdit.MMDiTConfig(**medium, lora_rank=32, lora_alpha=64.0, lora_targets=mmdit.LORA_PRESETS[preset])
    shapes = mmdit.param_shapes(cfg)["lora"]
    assert len(mmdit.lora_modules(cfg)) == n_modules and mmdit.param_count(shapes) == n_params, preset


def test_bad_entries_are_rejected():
  with pytest.raises(ValueError, match="never a layer index"):
    mmdit.MMDiTConfig(**SD35, lora_targets=("transformer_blocks.0.attn.to_q",))
  with pytest.raises(ValueError, match=r"unknown lora_targets \['proj'\]"):  # PEFT would also take pos_embed.proj
    mmdit.MMDiTConfig(**SD35, lora_targets=("proj",))
  with pytest.raises(ValueError, match="FLUX.1: unknown lora_targets"):
    flux.FluxConfig(**FLUX1, lora_targets=("attn.to_qkv_mlp_proj",))
  with pytest.raises(ValueError, match="FLUX.2: unknown lora_targets"):
    flux.Flux2Config(**FLUX2, lora_targets=("ff.net.2",))
  assert "attn2.to_q" in mmdit.LORA_TARGETS and "attn2.to_q" not in flux.LORA_TARGETS


def test_every_lora_site_has_a_sharding_rule():
  """The MLP adapters inherit the rules of the kernels they adapt (parallel/rules.py PARAM_AXES), in every family."""
  from normguard_jax.parallel import mesh as mesh_lib, rules
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=2))
  models = {"sd35": (mmdit.MMDiTConfig, mmdit.LORA_SITES), "flux1": (flux.FluxConfig, flux.FLUX1_LORA_SITES),
            "flux2_klein": (flux.Flux2Config, flux.FLUX2_LORA_SITES)}
  for family, (cls, sites) in models.items():
    module, kwargs = FAMILIES[family][2], FAMILIES[family][1]
    shapes = module.param_shapes(cls(**kwargs, lora_rank=R, lora_targets=sites))["lora"]
    specs = rules.tree_partition_specs(shapes, mesh)  # raises naming any leaf that no rule covers
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    assert len(jax.tree_util.tree_leaves(specs, is_leaf=is_spec)) == len(jax.tree_util.tree_leaves(shapes))
    assert len(module.lora_modules(cls(**kwargs, lora_rank=R, lora_targets=sites))) == {
        "sd35": 2 * 16 + 12 + 9, "flux1": 2 * 12 + 2 * 3, "flux2_klein": 2 * 12 + 2 * 2}[family]
