"""CLIP towers, PickScore / CLIP score / aesthetic rewards: parity with transformers' PyTorch CLIPModel, JAX
preprocessing against CLIPImageProcessor (PIL backend), host tokenisation against CLIPTokenizer, and the
strict converter / head loader fault cases. Everything is tiny and offline: a random fp32 CLIPModel saved with
save_pretrained, and a byte-level BPE vocabulary (256 byte symbols, their "</w>" forms, a few merges, BOS/EOS)
built here.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from normguard_jax.convert import ConversionError  # noqa: E402
from normguard_jax.convert import clip as convert_clip  # noqa: E402
from normguard_jax.models import clip  # noqa: E402
from normguard_jax.rewards import clip_rewards as cr  # noqa: E402
from normguard_jax.rewards.api import RewardBatch  # noqa: E402
from tests.torch_helpers import errors, randomize_torch  # noqa: E402

PROMPTS = ["The cat and  the DOG", "a photo of a cat, 4k!", "x " * 100]  # mixed case, punctuation, truncation
SIZE = 32
MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>")]


def byte_symbols():
  """GPT-2 / CLIP byte -> printable unicode symbol table (printable latin-1 bytes map to themselves)."""
  printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
  out, shift = [], 0
  for b in range(256):
    if b in printable:
      out.append(chr(b))
    else:
      out.append(chr(256 + shift))
      shift += 1
  return out


def tiny_vocab():
  syms = byte_symbols()
  vocab = {s: i for i, s in enumerate(syms + [s + "</w>" for s in syms] + [a + b for a, b in MERGES])}
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP (the legacy argmax pooling relies on it)
  return vocab


def torch_config(vocab_size, eos):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                       bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         image_size=SIZE, patch_size=8, hidden_act="gelu"),
      projection_dim=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model_dir, processor_dir, torch model, HF tokenizer, HF image processor)."""
  root = tmp_path_factory.mktemp("clip")
  vocab = tiny_vocab()
  model = randomize_torch(transformers.CLIPModel(torch_config(len(vocab), len(vocab) - 1)), seed=0)
  with torch.no_grad():
    model.logit_scale.fill_(float(np.log(80.0)))
  model_dir, proc_dir = root / "model", root / "processor"
  model.save_pretrained(model_dir)
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=MERGES)
  tok.save_pretrained(proc_dir)
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
  proc.save_pretrained(proc_dir)
  return model_dir, proc_dir, model, transformers.CLIPTokenizer.from_pretrained(proc_dir), proc


def torch_embeds(model, ids, mask, pixels_nhwc):
  with torch.no_grad():
    t = model.text_projection(model.text_model(input_ids=torch.tensor(ids, dtype=torch.long),
                                               attention_mask=torch.tensor(mask)).pooler_output)
    i = model.visual_projection(model.vision_model(
        pixel_values=torch.tensor(np.asarray(pixels_nhwc)).permute(0, 3, 1, 2)).pooler_output)
  return t, i


def random_images(b, h, w, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


def test_embeds_and_pickscore_match_transformers(tiny):
  model_dir, proc_dir, model, hf_tok, _ = tiny
  reward = cr.build_pickscore({"model_dir": str(model_dir), "processor_dir": str(proc_dir)})
  cfg, params, spec = reward.scorer.cfg, reward.scorer.params, reward.scorer.spec
  assert cfg.text.eos_token_id == len(tiny_vocab()) - 1 and cfg.projection_dim == 16

  ids, mask = reward.scorer.tokenizer(PROMPTS)
  ref = hf_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])

  images = random_images(3, 40, 48)
  t_ref, i_ref = torch_embeds(model, ids, mask, cr.preprocess(images, spec))
  text, image = cr.embed_pair(params, jnp.asarray(images), ids, mask, cfg=cfg, spec=spec)  # the reward's program
  t_err, i_err = errors(text, t_ref.numpy()), errors(image, i_ref.numpy())
  # Flow-Factory pick_score.py with the PyTorch model, on the same pixels and token ids
  t_n, i_n = t_ref / t_ref.norm(p=2, dim=-1, keepdim=True), i_ref / i_ref.norm(p=2, dim=-1, keepdim=True)
  s_ref = (model.logit_scale.exp() * (t_n @ i_n.T)).diag().detach().numpy() / 26
  scores = reward(RewardBatch(jnp.asarray(images), prompts=PROMPTS))
  s_err = errors(scores, s_ref)
  print(f"\nCLIP parity (abs, rel): text {t_err}, image {i_err}, pickscore {s_err}; scores {np.asarray(scores)}")
  assert t_err[1] < 1e-5 and i_err[1] < 1e-5
  assert s_err[1] < 1e-5 and scores.dtype == jnp.float32 and scores.shape == (3,)

  clip_reward = cr.build_clip_score({"model_dir": str(model_dir), "processor_dir": str(proc_dir), "scale": 100})
  cos_ref = (t_n * i_n).sum(-1).numpy()
  assert errors(clip_reward(RewardBatch(jnp.asarray(images), prompts=PROMPTS)), 100 * cos_ref)[1] < 1e-5


def test_legacy_eos_pooling_and_padding_mask(tiny):
  """eos_token_id == 2 (pre-#24773 configs): pooled at argmax(input_ids), here not at the EOS; left padding
  exercises the padding mask (the first-EOS path and right padding are covered above)."""
  model_dir, _, model, _, _ = tiny
  cfg, params = convert_clip.load_clip(model_dir)
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=2))
  eos = len(tiny_vocab()) - 1
  ids = np.random.default_rng(1).integers(0, eos - 2, (2, 12))
  ids[0, 4], ids[1, 11] = eos - 1, eos  # row 0: the largest id is not an EOS (argmax 4; first-EOS would be 0)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  model.text_model.eos_token_id = 2
  try:
    t_ref, _ = torch_embeds(model, ids, mask, np.zeros((1, SIZE, SIZE, 3), np.float32))
  finally:
    model.text_model.eos_token_id = eos
  text = jax.jit(clip.text_embeds, static_argnums=3)(params, ids, mask, cfg)
  assert errors(text, t_ref.numpy())[1] < 1e-5


def test_prompts_are_required(tiny):
  model_dir, proc_dir, _, _, _ = tiny
  reward = cr.build_pickscore({"model_dir": str(model_dir), "processor_dir": str(proc_dir)})
  images = jnp.zeros((2, SIZE, SIZE, 3))
  with pytest.raises(ValueError, match="RewardBatch.prompts is None"):
    reward(RewardBatch(images))
  with pytest.raises(ValueError, match="1 prompts for 2 images"):
    reward(RewardBatch(images, prompts=["a"]))
  with pytest.raises(ValueError, match="unknown option"):
    cr.build_pickscore({"model_dir": str(model_dir), "bogus": 1})
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    cr.build_pickscore({"model_dir": str(model_dir)})  # processor files live elsewhere


def test_tokenizer_from_vocab_and_merges(tiny, tmp_path):
  _, proc_dir, _, hf_tok, _ = tiny
  d = tmp_path / "vm"
  shutil.copytree(proc_dir, d)
  os.remove(d / "tokenizer.json")
  (d / "vocab.json").write_text(json.dumps(tiny_vocab()))
  (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
  prompts = PROMPTS + ["Ünïcode café 😀"]
  ids, mask = cr.ClipTokenizer(d)(prompts)
  ref = hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_preprocess_matches_clip_image_processor(tiny, tmp_path):
  """Our float pipeline vs CLIPImageProcessor (PIL backend) on uint8 random-noise images (the worst case for
  resampling): PIL rounds to uint8 after each of its two resize passes, we do not, so the tolerance is
  ~1.3 uint8 levels in normalised units (0.02; measured <= 0.0152), mean <= 0.006 (measured ~0.0045).
  With quantize=True (PIL's rounding emulated) >= 99% of pixels agree to 1e-5, the rest by one level."""
  _, proc_dir, _, _, proc = tiny
  spec = cr.load_image_spec(proc_dir)
  one_level = 1 / 255 / min(spec.std) + 1e-5
  rng = np.random.default_rng(0)
  pre = jax.jit(cr.preprocess, static_argnames=("spec", "quantize"))
  for h, w in ((45, 61), (20, 24), (96, 80), (37, 32)):  # down, up, down (portrait), crop only
    img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    ref = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    x = img[None].astype(np.float32) / 127.5 - 1
    err = np.abs(np.asarray(pre(x, spec))[0] - ref)
    err_q = np.abs(np.asarray(pre(x, spec, quantize=True))[0] - ref)
    print(f"\npreprocess {h}x{w}: max {err.max():.4f} mean {err.mean():.4f}; quantized: max {err_q.max():.4f}, "
          f"{(err_q <= 1e-5).mean():.4f} within 1e-5")
    assert err.max() < 0.02 and err.mean() < 0.006
    assert err_q.max() < one_level and (err_q <= 1e-5).mean() >= 0.99
  # the legacy (laion / openai) int form of preprocessor_config.json reads the same
  legacy = tmp_path / "legacy"
  os.makedirs(legacy)
  (legacy / "preprocessor_config.json").write_text(json.dumps(dict(
      crop_size=SIZE, size=SIZE, do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
      image_mean=list(spec.mean), image_std=list(spec.std), feature_extractor_type="CLIPFeatureExtractor")))
  assert cr.load_image_spec(legacy) == spec


# ----------------------------------------------------------------------------------------------- converter


@pytest.fixture
def model_copy(tiny, tmp_path):
  d = tmp_path / "m"
  shutil.copytree(tiny[0], d)
  return d, load_file(str(d / "model.safetensors"))


def raises(path, *needles):
  with pytest.raises(ConversionError) as info:
    convert_clip.load_clip(path)
  for needle in needles:
    assert needle in str(info.value), str(info.value)
  return info.value


def test_converter_faults(model_copy, tmp_path):
  d, tensors = model_copy
  weights = d / "model.safetensors"

  def rewrite(**changes):
    t = dict(tensors)
    for k, v in changes.items():
      k = k.replace("__", ".")
      if v is None:
        del t[k]
      else:
        t[k] = v
    save_file(t, str(weights))

  key = "text_model.encoder.layers.1.self_attn.q_proj.weight"
  rewrite(**{key.replace(".", "__"): None})
  raises(d, f"missing key '{key}'")
  rewrite(vision_model__encoder__layers__0__mlp__bogus=np.zeros(3, np.float32))
  raises(d, "extra key 'vision_model.encoder.layers.0.mlp.bogus'")
  rewrite(visual_projection__weight=tensors["visual_projection.weight"].T.copy())
  raises(d, "wrong shape for 'visual_projection.weight': [32, 16], expected [16, 32]")
  rewrite(logit_scale=tensors["logit_scale"].astype(np.float64))
  raises(d, "wrong dtype for 'logit_scale': F64")
  # legacy persistent position_ids buffers: accepted when equal to arange, named otherwise
  rewrite(text_model__embeddings__position_ids=np.arange(77, dtype=np.int64)[None],
          vision_model__embeddings__position_ids=np.arange(17, dtype=np.int64)[None])
  convert_clip.load_clip(d)
  rewrite(text_model__embeddings__position_ids=np.arange(77, dtype=np.int64)[None] + 1)
  raises(d, "text_model.embeddings.position_ids: legacy buffer differs")
  # truncated file
  rewrite()
  data = weights.read_bytes()
  weights.write_bytes(data[:-100])
  raises(d, "truncated")
  weights.write_bytes(data)
  # wrong directories
  raises(tmp_path / "nonexistent", "wrong directory", "no config.json")
  os.makedirs(tmp_path / "proc")
  raises(tmp_path / "proc", "wrong directory")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, model_type="siglip")))
  raises(d, "model_type 'siglip', expected 'clip'")
  (d / "config.json").write_text(json.dumps(cfg))
  os.remove(weights)
  (d / "pytorch_model.bin").write_bytes(b"")
  raises(d, "no *.safetensors", "only PyTorch .bin weights")


def test_converter_sharded(model_copy):
  d, tensors = model_copy
  os.remove(d / "model.safetensors")
  keys = sorted(tensors)
  weight_map = {}
  for n, part in enumerate((keys[::2], keys[1::2])):
    name = f"model-0000{n + 1}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, str(d / name))
    weight_map.update({k: name for k in part})
  (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, params = convert_clip.load_clip(d)
  np.testing.assert_array_equal(params["vision"]["layers"]["fc1"]["kernel"][1],
                                tensors["vision_model.encoder.layers.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(params["vision"]["patch_embedding"]["kernel"],
                                tensors["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))


# ----------------------------------------------------------------------------------------------- aesthetic


def torch_head(input_dim, relu, seed):
  nn = torch.nn
  widths = (input_dim,) + cr.AESTHETIC_WIDTHS
  layers = []
  for j in range(5):
    layers.append(nn.Linear(widths[j], widths[j + 1]))
    if j < 3:
      layers += [nn.ReLU()] if relu else []
      layers.append(nn.Dropout((0.2, 0.2, 0.1)[j]))
    elif j == 3 and relu:
      layers.append(nn.ReLU())
  torch.manual_seed(seed)
  head = nn.Sequential(*layers)
  randomize_torch(head, seed)
  return head.eval()


def test_aesthetic_head_parity_and_strict_loader(tiny, tmp_path):
  from safetensors.torch import save_file as save_torch
  model_dir, proc_dir, model, _, _ = tiny
  emb = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
  emb[3] = 0  # the reference leaves a zero embedding as is
  for relu in (False, True):
    head = torch_head(16, relu, seed=3)
    path = tmp_path / f"head_{relu}.safetensors"
    save_torch({f"layers.{k}": v for k, v in head.state_dict().items()}, str(path))
    layout, params = cr.load_aesthetic_head(path, 16)
    assert layout == ("relu" if relu else "linear")
    e = torch.tensor(emb)
    norm = e.norm(dim=-1, keepdim=True)
    with torch.no_grad():
      ref = head(e / torch.where(norm == 0, torch.ones_like(norm), norm))[:, 0].numpy()
    assert errors(cr.aesthetic_head(params, jnp.asarray(emb), layout), ref)[1] < 1e-5

  # end to end on images, against the PyTorch CLIP image embeddings
  reward = cr.build_aesthetic({"model_dir": str(model_dir), "processor_dir": str(proc_dir),
                               "head_path": str(tmp_path / "head_False.safetensors")})
  images = random_images(2, 40, 40, seed=5)
  _, i_ref = torch_embeds(model, np.zeros((2, 77), np.int64), np.ones((2, 77), np.int64),
                          cr.preprocess(images, cr.load_image_spec(proc_dir)))
  head = torch_head(16, False, seed=3)
  with torch.no_grad():
    ref = head(i_ref / i_ref.norm(dim=-1, keepdim=True))[:, 0].numpy()
  assert errors(reward(RewardBatch(jnp.asarray(images))), ref)[1] < 1e-5

  # strict: missing / extra / misshapen keys named together; wrong input width; no such file
  sd = load_file(str(tmp_path / "head_False.safetensors"))
  bad = dict(sd)
  del bad["layers.4.bias"]
  bad["layers.5.weight"] = np.zeros((2, 2), np.float32)
  bad["layers.7.weight"] = bad["layers.7.weight"].T.copy()
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConversionError) as info:
    cr.load_aesthetic_head(tmp_path / "bad.safetensors", 16)
  msg = str(info.value)
  assert "missing key 'layers.4.bias'" in msg and "extra key 'layers.5.weight'" in msg
  assert "wrong shape for 'layers.7.weight': [16, 1], expected [1, 16]" in msg
  with pytest.raises(ConversionError, match="wrong shape for 'layers.0.weight'"):
    cr.load_aesthetic_head(tmp_path / "head_False.safetensors", 768)
  with pytest.raises(ConversionError, match="no such file"):
    cr.load_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", 16)
