"""Helpers the test modules share (tests/ is on pytest's pythonpath): tiny peer-model sizes, tensor layout
conversions, comparisons, a tiny diffusers Karlo folder, a random tiny bundle, synthetic prior data. Not a test
module: test modules import from here, never from each other."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import bundle, config_lib
from unclip_jax.stages import builders
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import prior as prior_stage

# ---- tiny diffusers / transformers peers ---------------------------------------------------------------------------
DECODER_KW = dict(sample_size=16, in_channels=3, out_channels=6,
                  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                    "SimpleCrossAttnDownBlock2D"],
                  up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[16, 32, 48], layers_per_block=2,
                  norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8,
                  resnet_time_scale_shift="scale_shift", class_embed_type="identity")
SR_KW = dict(sample_size=32, in_channels=6, out_channels=3, layers_per_block=2, norm_num_groups=8,
             block_out_channels=[16, 32, 48], down_block_types=["ResnetDownsampleBlock2D"] * 3,
             up_block_types=["ResnetUpsampleBlock2D"] * 3, add_attention=False)
PRIOR_KW = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, embedding_dim=32, num_embeddings=16,
                additional_embeddings=4)
TP_KW = dict(clip_extra_context_tokens=4, clip_embeddings_dim=32, time_embed_dim=64, cross_attention_dim=24)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=32, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
            pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=2, projection_dim=32, hidden_act="quick_gelu")
SCHEDULERS = dict(prior_scheduler=dict(variance_type="fixed_small_log", prediction_type="sample",
                                       clip_sample_range=5.0),
                  decoder_scheduler=dict(variance_type="learned_range", prediction_type="epsilon"),
                  super_res_scheduler=dict(variance_type="fixed_small_log", prediction_type="epsilon"))
REL_TOL = 1e-4


def randomize(model, seed, scale=0.2):
  """Every parameter of a torch module ~ N(0, scale²) (diffusers, Karlo and GLIDE zero-init several; zeros hide
  layout bugs). Returns the module in eval mode."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def make_torch_prior(seed=0):
  """A tiny diffusers PriorTransformer with every parameter random (clip_std kept positive)."""
  import diffusers
  import torch

  torch.manual_seed(seed)
  model = randomize(diffusers.PriorTransformer(**PRIOR_KW), seed + 1)
  with torch.no_grad():
    model.clip_std.abs_().add_(0.5)
  return model


def unclip_text_proj_class():
  """diffusers' UnCLIPTextProjModel (its module moved in diffusers 0.38)."""
  try:
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  except ImportError:
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
  return UnCLIPTextProjModel


def nchw(x):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def compare(got, want, what, rel_tol=REL_TOL):
  """Asserts max|got - want| / max|want| < rel_tol; returns (max abs error, relative error)."""
  err = np.abs(got - want).max()
  rel = err / np.abs(want).max()
  print(f"{what}: max|d|={err:.3g} rel={rel:.3g} (max|want|={np.abs(want).max():.3g})")
  assert rel < rel_tol, f"{what}: relative error {rel:.3g}"
  return err, rel


def make_torch_decoder():
  """The tiny diffusers decoder UNet and text projection, every parameter random (incl. the CFG embedding)."""
  import diffusers
  import torch

  torch.manual_seed(0)
  unet = randomize(diffusers.UNet2DConditionModel(**DECODER_KW), 1)
  text_proj = randomize(unclip_text_proj_class()(**TP_KW), 5)
  return unet, text_proj


def letters_tokenizer(length=16):
  """An offline CLIPTokenizer over single letters (+ a few merges); EOS has the largest id (argmax pooling)."""
  from transformers import CLIPTokenizer

  vocab = {"!": 0}
  for suffix in ("", "</w>"):
    for c in "abcdefghijklmnopqrstuvwxyz":
      vocab[c + suffix] = len(vocab)
  for piece in ("lo", "low</w>", "er</w>", "<|startoftext|>", "<|endoftext|>"):
    vocab[piece] = len(vocab)
  merges = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>")]
  return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=length)


def convert_decoder(unet, text_proj, tmp):
  """A torch decoder UNet + text projection -> (our UNet, our text projection, params) through saved folders."""
  from unclip_jax.convert import unet as convert_unet

  unet.save_pretrained(tmp / "decoder")
  text_proj.save_pretrained(tmp / "text_proj")
  unet_cfg, unet_params = convert_unet.load_diffusers_unet(tmp / "decoder")
  tp_cfg, tp_params = convert_unet.load_diffusers_text_proj(tmp / "text_proj")
  return (builders.unet(unet_cfg, dtype="float32"), convert_unet.text_proj_from_block(tp_cfg, dtype="float32"),
          {"unet": unet_params, "text_proj": tp_params})


def decoder_diffusion():
  """The decoder's diffusion (cosine, ε, learned-range variance), as diffusers' Karlo decoder scheduler."""
  from unclip_jax.diffusion.gaussian import GaussianDiffusion
  from unclip_jax.diffusion.schedules import NoiseSchedule

  return GaussianDiffusion(NoiseSchedule.create("cosine", 1000), prediction="eps", variance="learned_range")


def fake_randn_from(noises, calls):
  """A stand-in for diffusers' `randn_tensor` returning `noises` in call order (the steps with t > 0)."""
  def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
    calls.append(tuple(shape))
    out = noises[len(calls) - 1]
    assert tuple(out.shape) == tuple(shape), (out.shape, shape)
    return out.to(dtype=dtype)
  return fake_randn


def tiny_tokenizer(d, length=16):
  """An offline CLIPTokenizer over a 11-entry vocabulary written into folder `d`."""
  import transformers

  d = pathlib.Path(d)
  vocab = {"!": 0, "l": 1, "o": 2, "w</w>": 3, "e": 4, "r</w>": 5, "lo": 6, "low</w>": 7, "er</w>": 8,
           "<|startoftext|>": 9, "<|endoftext|>": 10}
  (d / "vocab.json").write_text(json.dumps(vocab))
  (d / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
  return transformers.CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), pad_token="!",
                                    model_max_length=length)


def save_tiny_karlo(root) -> dict:
  """Writes a tiny random diffusers Karlo folder (saved by the real UnCLIPPipeline, 0.42 model_index, plus an
  image_encoder folder) to `root`/src. Returns dict(src=folder, torch={name: module}, schedulers={name: scheduler})."""
  import diffusers
  import torch
  import transformers

  root = pathlib.Path(root)
  torch.manual_seed(0)
  models = dict(
      prior=randomize(diffusers.PriorTransformer(**PRIOR_KW), 1),
      text_proj=randomize(unclip_text_proj_class()(**TP_KW), 2),
      decoder=randomize(diffusers.UNet2DConditionModel(**DECODER_KW), 3),
      super_res_first=randomize(diffusers.UNet2DModel(**SR_KW), 4),
      super_res_last=randomize(diffusers.UNet2DModel(**SR_KW), 5),
      text_encoder=randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)), 6))
  with torch.no_grad():
    models["prior"].clip_std.abs_().add_(0.5)
  image_encoder = randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), 7)
  schedulers = {k: diffusers.UnCLIPScheduler(**v) for k, v in SCHEDULERS.items()}
  tok_dir = root / "tok"
  tok_dir.mkdir(parents=True, exist_ok=True)
  pipe = diffusers.UnCLIPPipeline(tokenizer=tiny_tokenizer(tok_dir), **models, **schedulers)
  src = root / "src"
  pipe.save_pretrained(src)
  image_encoder.save_pretrained(src / "image_encoder")
  return dict(src=src, torch={**models, "image_encoder": image_encoder}, schedulers=schedulers)


# ---- synthetic prior data --------------------------------------------------------------------------------------
PAIR_E, PAIR_L = 32, 8


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_pairs(n, seed):
  """text emb t ~ N(0, I); token states = per-position mixes of t; image = unit(W t + m + 0.1·noise).

  The fixed offset m plays the role of CLIP's common direction, so the mean image embedding is a real baseline.
  """
  e, length = PAIR_E, PAIR_L
  fixed = np.random.default_rng(1234)
  w = fixed.standard_normal((e, e)) / np.sqrt(e)
  m = 2.0 * unit(fixed.standard_normal(e))
  mix = fixed.standard_normal((length, e, e)) / np.sqrt(e)
  rng = np.random.default_rng(seed)
  t = rng.standard_normal((n, e))
  lengths = rng.integers(2, length + 1, n)
  mask = np.arange(length)[None] < lengths[:, None]
  enc = np.einsum("lef,nf->nle", mix, t) * mask[..., None]
  img = unit(t @ w.T + m + 0.1 * rng.standard_normal((n, e)))
  f = lambda x: jnp.asarray(x, jnp.float32)
  return dict(text_emb=f(t), text_enc=f(enc), text_mask=jnp.asarray(mask), image_emb=f(img))


# ---- a random tiny unCLIP bundle ---------------------------------------------------------------------------------
ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = 16          # = the tiny prior's num_embeddings


def _randomize(params, seed, scale=0.05):
  """Every leaf perturbed (zero-initialised output layers would make every stage trivially constant)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x, np.float32)
                                   + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
                                   for x in leaves])


def tiny_configs():
  clip = config_lib.load_config("configs/clip.py:tiny", ["model.text.vocab_size=49408",
                                                         f"model.text.context_length={CONTEXT}",
                                                         "model.vision.image_size=32", "model.vision.patch_size=8"])
  prior = config_lib.load_config("configs/prior.py:tiny", ["sampling.steps='5'"])
  decoder = config_lib.load_config("configs/decoder.py:tiny", ["sampling.steps='5'"])
  sr = config_lib.load_config("configs/upsampler.py:tiny", ["sampling.steps='3'"])
  return clip, prior, decoder, sr


def build_tiny_bundle(path, seed=0, super_res=True, decoder_overrides=()):
  """A random tiny text-to-image bundle; `decoder_overrides` (config overrides) change the decoder, e.g. to the
  paper's GLIDE + CLIP pathway."""
  clip_cfg, prior_cfg, dec_cfg, sr_cfg = tiny_configs()
  if decoder_overrides:
    dec_cfg = config_lib.load_config("configs/decoder.py:tiny", ["sampling.steps='5'", *decoder_overrides])
  key = jax.random.key(seed)
  clip_params = _randomize(builders.init_clip(builders.clip(clip_cfg.model), key), seed)
  prior = builders.prior(prior_cfg.model)
  prior_params = _randomize(builders.init_prior(prior, key), seed + 1)
  prior_params = prior_stage.with_clip_stats(prior_params, np.zeros((1, 32)), np.ones((1, 32)))
  if dec_cfg.model.text_encoder == "text_proj":
    unet = builders.unet(dec_cfg.model)
    text_proj = builders.text_proj(dec_cfg.model)
    dec_params = {"unet": _randomize(builders.init_unet(unet, key), seed + 2),
                  "text_proj": _randomize(builders.init_text_proj(text_proj, key), seed + 3)}
  else:
    dec_params = _randomize(decoder_stage.init_params(decoder_stage.build(dec_cfg), key), seed + 2)
  path = pathlib.Path(path)
  bundle.save_component(path, "clip", clip_cfg, clip_params)
  bundle.save_component(path, "prior", prior_cfg, prior_params)
  bundle.save_component(path, "decoder", dec_cfg, dec_params)
  if super_res:
    sr = builders.unet(sr_cfg.model)
    bundle.save_component(path, "super_res_first", sr_cfg, _randomize(builders.init_unet(sr, key), seed + 4))
    bundle.save_component(path, "super_res_last", sr_cfg, _randomize(builders.init_unet(sr, key), seed + 5))
  return path


# ---- a two-process CPU training run (launch/gpu.sh) ------------------------------------------------------------
def random_embeddings_dataset(tmp_path, n=32, e=32, length=16):
  """A prior-training embeddings dataset of random rows (array_record) under tmp_path/emb."""
  from unclip_jax.data import builders as data_builders

  rng = np.random.default_rng(0)
  return data_builders.build_embeddings(
      {"image_emb": rng.standard_normal((n, e)).astype(np.float32),
       "text_emb": rng.standard_normal((n, e)).astype(np.float32),
       "text_enc": rng.standard_normal((n, length, e)).astype(np.float32),
       "text_mask": np.ones((n, length), bool)}, tmp_path, "emb")


def two_process_train(workdir, data_dir, *overrides, timeout=600, log_dir=None):
  """`launch/gpu.sh` training the tiny prior in 2 CPU processes of 4 devices each (one 8-device mesh, data 4 x fsdp
  2). The process logs go to `log_dir` (default WORKDIR/logs; give one for a gs:// workdir). Returns {process
  index: its log text}; asserts the run succeeded."""
  import os
  import subprocess
  import sys

  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(UNCLIP_LAUNCH_CPU="1", NPROC="2", CPU_DEVICES="4",
             UNCLIP_VENV=str(pathlib.Path(sys.executable).parent.parent))
  log_dir = pathlib.Path(log_dir) if log_dir else pathlib.Path(workdir) / "logs"
  env["LOG_DIR"] = str(log_dir)
  cmd = ["bash", str(ROOT / "launch" / "gpu.sh"), f"--config={ROOT}/configs/prior.py:tiny", f"--workdir={workdir}",
         f"--config.data.dirs=('{data_dir}',)", "--config.stats_examples=8", "--config.dtype=float32",
         "--config.log_every=1", "--config.eval_every=0", "--config.mesh.data=4", "--config.mesh.fsdp=2",
         *overrides]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
  logs = {i: (log_dir / f"process_{i}.log").read_text() for i in range(2)}
  assert out.returncode == 0, out.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
  return logs


# ---- FID Inception weights and a COCO-like dataset ---------------------------------------------------------------
def synthetic_inception_state_dict(seed: int = 0) -> dict:
  """A random torch state dict in pytorch-fid's layout, built from the converter's expected keys and shapes
  (He-scaled convs, non-trivial BatchNorm): for the tests that need weights but not the reference package."""
  import torch

  from unclip_jax.convert import inception as inception_weights

  g = torch.Generator().manual_seed(seed)
  sd = {}
  for (col, *path), shape in inception_weights.expected_variable_shapes().items():
    key = inception_weights._torch_key((col, *path))
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:  # [kh, kw, I, O] -> [O, I, kh, kw]
      kh, kw, i, o = shape
      sd[key] = torch.randn((o, i, kh, kw), generator=g) * (2.0 / (kh * kw * i)) ** 0.5
    elif leaf == "kernel":  # fc [2048, 1008] -> [1008, 2048]
      sd[key] = torch.randn(shape[::-1], generator=g) * 0.02
    elif leaf == "scale":
      sd[key] = torch.empty(shape).uniform_(0.5, 1.5, generator=g)
    elif leaf == "var":
      sd[key] = torch.empty(shape).uniform_(0.5, 2.0, generator=g)
    else:  # bias, mean
      sd[key] = 0.1 * torch.randn(shape, generator=g)
    if leaf == "var":
      sd[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
  return sd


def write_coco_like(root, n: int, *, size: int = 64, pad: int = 8, first_id: int = 42, id_step: int = 7) -> dict:
  """A tiny MS-COCO val2014 look-alike drawn by the shapes renderer, under `root`:

    val2014/COCO_val2014_<id:012d>.jpg   image k (`shapes.folder.write_real_folder`, size²) centred on a
                                         [size, size + 2·pad] canvas of its background colour (JPEG, quality 95), so
                                         a centre crop to size² gives the square back (up to JPEG rounding)
    squares/NNNN.png + NNNN.json         the size² originals and their prompts
    captions_val2014.json                COCO's layout: "images" (id, file_name, width, height) and "annotations"
                                         (two shapes captions per image: its prompt and template 0 of its labels)
  Returns dict(captions=path, images=folder, squares=folder, ids=[id of image k], prompts=[prompt of image k]).
  """
  from PIL import Image

  from unclip_jax.shapes import data as shapes
  from unclip_jax.shapes.folder import write_real_folder

  root = pathlib.Path(root)
  prompts = write_real_folder(root / "squares", n, size=size)
  images = root / "val2014"
  images.mkdir(parents=True, exist_ok=True)
  ids = [first_id + id_step * k for k in range(n)]
  table, annotations = [], []
  for k, image_id in enumerate(ids):
    meta = json.loads((root / "squares" / f"{k:04d}.json").read_text())
    canvas = Image.new("RGB", (size + 2 * pad, size), shapes.COLOURS[meta["background"]])
    canvas.paste(Image.open(root / "squares" / f"{k:04d}.png").convert("RGB"), (pad, 0))
    name = f"COCO_val2014_{image_id:012d}.jpg"
    canvas.save(images / name, quality=95)
    table.append({"id": image_id, "file_name": name, "width": size + 2 * pad, "height": size})
    for caption in (prompts[k], shapes.caption(meta["colour"], meta["shape"], meta["background"], 0)):
      annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
  captions = root / "captions_val2014.json"
  captions.write_text(json.dumps({"info": {"description": "shapes as COCO"}, "images": table,
                                  "annotations": annotations}))
  return dict(captions=str(captions), images=str(images), squares=str(root / "squares"), ids=ids, prompts=prompts)
