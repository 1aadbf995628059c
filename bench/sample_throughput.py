"""Text-to-image throughput: unclip_jax's `UnCLIP` pipeline vs diffusers' `UnCLIPPipeline`, same device and sizes.

Both chains run the Karlo recipe: CLIP text encoding, prior 25 steps guided 4.0 (one candidate: diffusers has no
reranking), decoder 25 steps guided 8.0, super-res 7 steps with the first/last two-model split; the uncond branches
see the CLIP encoding of "" (as diffusers). Weights are random (no downloads): ours from `configs/*.py` (karlo,
karlo_64_256, vit_l14 text tower; or tiny) with jax random init; the peer's from the matching diffusers /
transformers configs with torch's own init.

  python bench/sample_throughput.py --size karlo --batch 1,8,32 --repeats 3 --json out.json   # GPU
  python bench/sample_throughput.py --size tiny --batch 2 --repeats 1                         # CPU smoke size

Per batch size: seconds per stage and per batch (median of --repeats after a warm-up run; stages end with a
block_until_ready, the last one with the images on the host, as diffusers returns them), images/s, FLOPs per
image (XLA cost analysis of one model forward × forwards, or the jaxpr count where XLA gives none; the FLOP source
column says which), MFU against the device's dense bf16 peak (when known), peak device memory, first-call and
compile seconds per stage, and ours/diffusers images/s. The peer runs first in a child process (so the two
frameworks never share memory or threads), then ours. Results are printed, never asserted.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

STAGES = ("text", "prior", "decoder", "super_res")
SIZES = {
    "karlo": {"clip": ("clip.py:vit_l14", []), "prior": ("prior.py:karlo", []), "decoder": ("decoder.py:karlo", []),
              "super_res": ("upsampler.py:karlo_64_256", [])},
    "tiny": {"clip": ("clip.py:tiny", ["model.text.vocab_size=49408", "model.text.context_length=16"]),
             "prior": ("prior.py:tiny", []), "decoder": ("decoder.py:tiny", []),
             "super_res": ("upsampler.py:tiny", [])},
}
DEFAULT_BATCH = {"karlo": "1,8,32", "tiny": "2"}
PROMPTS = ("a red circle on a white background", "an oil painting of a fox in the snow at dusk",
           "a bowl of soup that looks like a monster, knitted out of wool", "green square",
           "a photograph of an astronaut riding a horse on the moon, high detail, 35mm",
           "an isometric pixel-art castle on a floating island")
THROUGHPUT_COLUMNS = ("impl", "batch", "dtype", "text s", "prior s", "decoder s", "super-res s", "total s/batch",
                      "img/s", "TFLOP/img", "FLOP src", "MFU", "peak mem GiB", "first call s", "ours/diffusers img/s")
STAGE_COLUMNS = ("stage", "batch", "forwards/img", "GFLOP/forward (xla)", "GFLOP/forward (jaxpr)", "GFLOP/img",
                 "FLOP src", "compile s", "first call s", "steady s")
COMPILE_COLUMNS = ("stage", "batch", "lower s", "compile s", "XLA mem GiB")
ABLATION_COLUMNS = ("decoder sampler variant", "batch", "s/batch", "vs scan+batched", "compile s")


def prompts_for(batch: int) -> list[str]:
  return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def parse_steps(text: str) -> dict[str, int]:
  values = common.parse_ints(text, "--steps")
  if len(values) != 3:
    raise ValueError(f"--steps takes prior,decoder,super_res step counts (3 integers), got {text!r}")
  return dict(zip(("prior", "decoder", "super_res"), values))


# ---- configs -----------------------------------------------------------------------------------------------------
def stage_configs(size: str, steps: dict[str, int], prior_guidance: float, decoder_guidance: float):
  """{"clip", "prior", "decoder", "super_res"} -> unlocked stage ConfigDicts for the pipeline and the peer."""
  import ml_collections as mlc

  from unclip_jax import config_lib

  if size not in SIZES:
    raise ValueError(f"unknown --size {size!r}; choose one of {sorted(SIZES)}")
  cfgs = {}
  for name, (spec, overrides) in SIZES[size].items():
    path, _, variant = spec.partition(":")
    d = config_lib.load_config(f"{common.CONFIG_DIR / path}:{variant}", overrides).to_dict()
    if name == "clip":          # Karlo's text_encoder: the text tower + projection only
      d["model"].update(vision=None, logit_scale=False)
    else:
      d["sampling"]["single_step_beta"] = "schedule"     # diffusers' UnCLIPScheduler β at the last step
    cfgs[name] = mlc.ConfigDict(d)
  cfgs["prior"].sampling.update(steps=str(steps["prior"]), guidance_scale=float(prior_guidance))
  cfgs["prior"].num_candidates = 1
  cfgs["prior"].null_text = "empty_prompt"
  cfgs["decoder"].sampling.update(steps=str(steps["decoder"]), guidance_scale=float(decoder_guidance))
  cfgs["decoder"].null_text = "empty_prompt"
  cfgs["super_res"].sampling.steps = str(steps["super_res"])
  cfgs["super_res"].last_step_model = True
  context = cfgs["clip"].model.text.context_length
  if cfgs["prior"].model.num_embeddings != context:
    raise ValueError(f"prior num_embeddings {cfgs['prior'].model.num_embeddings} != CLIP context {context}")
  return cfgs


# ---- ours --------------------------------------------------------------------------------------------------------
def build_pipeline(cfgs, *, dtype: str, param_dtype: str, seed: int, abstract: bool = False):
  """Random components -> `UnCLIP` (`common.random_init`: the models' jitted init on accelerators, N(0, 0.02²)
  on CPU). abstract=True: ShapeDtypeStruct params (nothing allocated; enough for FLOP counts)."""
  import jax
  import jax.numpy as jnp

  from unclip_jax import stages
  from unclip_jax.inference.pipeline import UnCLIP
  from unclip_jax.stages import builders

  keys = jax.random.split(jax.random.key(seed), 6)
  init = lambda fn, key, salt: (jax.eval_shape(fn, key) if abstract else
                                common.random_init(fn, key, seed=seed + salt))
  clip = stages.get("clip").build(cfgs["clip"], dtype="float32").clip
  clip_params = init(functools.partial(builders.init_clip, clip), keys[0], 0)
  prior = stages.get("prior").build(cfgs["prior"], dtype="float32").prior
  e = prior.embedding_dim
  prior_params = stages.get("prior").with_clip_stats(init(functools.partial(builders.init_prior, prior), keys[1], 1),
                                                     jnp.zeros((1, e)), jnp.ones((1, e)))
  decoder = stages.get("decoder").build(cfgs["decoder"], dtype="float32")
  decoder_params = {"unet": init(functools.partial(builders.init_unet, decoder.unet), keys[2], 2),
                    "text_proj": init(functools.partial(builders.init_text_proj, decoder.text_proj), keys[3], 3)}
  sr = stages.get("upsampler").build(cfgs["super_res"], dtype="float32").unet
  sr_params = [init(functools.partial(builders.init_unet, sr), keys[4 + i], 4 + i) for i in range(2)]
  cast = lambda t: t
  if param_dtype != "float32":
    cast = lambda t: jax.tree.map(lambda x: (jax.ShapeDtypeStruct(x.shape, param_dtype) if abstract else
                                             x.astype(param_dtype)), t)
  components = {"clip": (cfgs["clip"], cast(clip_params)), "prior": (cfgs["prior"], cast(prior_params)),
                "decoder": (cfgs["decoder"], cast(decoder_params)),
                "super_res_first": (cfgs["super_res"], cast(sr_params[0])),
                "super_res_last": (cfgs["super_res"], cast(sr_params[1]))}
  if not abstract:
    common.block(jax.tree.leaves({k: v[1] for k, v in components.items()}))
  return UnCLIP(components, dtype=dtype, devices=jax.devices()[:1])          # one device, as the peer


def run_chain(pipe, prompts, noise, compile_s: dict | None = None) -> dict[str, float]:
  """One text -> image run, blocking after each stage. Returns seconds per stage (compile seconds into `compile_s`)."""
  times = {}

  def stage(name, fn, arrays):
    timer = common.CompileTimer()
    t0 = time.perf_counter()
    with timer:
      out = fn()
      common.block(arrays(out))
    times[name] = time.perf_counter() - t0
    if compile_s is not None:
      compile_s[name] = timer.seconds
    return out

  text = stage("text", lambda: pipe.encode_text(prompts), lambda t: (t.emb, t.enc, t.mask))
  emb = stage("prior", lambda: pipe.sample_prior(text, noise.prior_rng), lambda x: x)
  low = stage("decoder", lambda: pipe.decode(emb, text, noise.decoder_rng), lambda x: x)
  stage("super_res", lambda: np.asarray(pipe.upsample(low, noise.super_res_rng)), lambda x: x)   # on host
  return times


def stage_flops(pipe, batch: int, source: str) -> dict[str, dict]:
  """Per stage: model calls per batch, rows per call, single-row forwards per image, FLOPs of one forward (XLA's
  count and the jaxpr count), FLOPs per image from the chosen source ("auto": XLA where it has a count)."""
  import jax
  import jax.numpy as jnp

  from unclip_jax.stages import decoder as decoder_lib
  from unclip_jax.inference.pipeline import num_steps
  from unclip_jax.models.clip import CLIP

  sds = jax.ShapeDtypeStruct
  b = batch
  e, l = pipe.prior.embedding_dim, pipe.prior.num_embeddings
  out = {}

  def add(name, fn, args, rows, calls):
    """One model call on `rows` rows (2B when guided), made `calls` times per batch of b images."""
    xla = common.xla_flops(fn, *args) if source != "jaxpr" else None
    counted = common.jaxpr_flops(fn, *args)
    value, src = (xla, "xla") if source == "xla" or (source == "auto" and xla is not None) else (counted, "jaxpr")
    forwards = calls * rows / b                            # single-row forwards per image
    per_row = None if value is None else value / rows
    out[name] = {"calls": calls, "rows_per_call": rows, "forwards_per_image": forwards,
                 "flops_per_forward": per_row, "flops_per_image": None if per_row is None else per_row * forwards,
                 "xla_flops_per_forward": None if xla is None else xla / rows,
                 "jaxpr_flops_per_forward": counted / rows, "source": src}

  add("text", lambda p, ids: pipe.clip.apply({"params": p}, ids, method=CLIP.encode_text),
      (common.abstract(pipe.clip_params), sds((b, l), jnp.int32)), b, 1)

  pc = pipe.prior_cfg
  rows = b * int(pc.num_candidates) * (2 if pc.sampling.guidance_scale != 1.0 else 1)
  add("prior", lambda p, x, t, te, enc, m: pipe.prior.apply({"params": p}, x, t, te, enc, m),
      (common.abstract(pipe.prior_params), sds((rows, e), jnp.float32), sds((rows,), jnp.int32),
       sds((rows, e), jnp.float32), sds((rows, l, e), jnp.float32), sds((rows, l), jnp.bool_)),
      rows, num_steps(pc))

  dc = pipe.decoder_cfg
  guided = dc.sampling.guidance_scale != 1.0
  cond = jax.eval_shape(lambda p, ie, te, enc, m: decoder_lib.decoder_cond(
      pipe.text_proj, p, image_emb=ie, text_emb=te, text_enc=enc, text_mask=m, guidance=guided),
      common.abstract(pipe.decoder_params["text_proj"]), sds((b, e), jnp.float32), sds((b, e), jnp.float32),
      sds((b, l, e), jnp.float32), sds((b, l), jnp.bool_))
  rows = 2 * b if guided else b
  s = pipe.decoder_size
  add("decoder", lambda p, x, t, kw: pipe.unet.apply({"params": p}, x, t, **kw),
      (common.abstract(pipe.decoder_params["unet"]), sds((rows, s, s, 3), jnp.float32), sds((rows,), jnp.int32),
       cond), rows, num_steps(dc))

  if pipe.sr_cfg is not None:
    s = pipe.image_size
    add("super_res", lambda p, x, t: pipe.sr_unet.apply({"params": p}, x, t),
        (common.abstract(pipe.sr_first), sds((b, s, s, pipe.sr_unet.in_channels), jnp.float32),
         sds((b,), jnp.int32)), b, num_steps(pipe.sr_cfg))
  return out


def compile_stages(pipe, batch: int) -> list[dict]:
  """Lowers and compiles each stage's jitted sampler from abstract params and inputs (nothing allocated, nothing
  run): seconds to trace + lower, seconds in the backend compiler, and XLA's memory estimate per stage. This is
  the first-compile cost of the sampling pipeline without the weights (the `< 90 s` target of bench/NOTES.md)."""
  import jax
  import jax.numpy as jnp

  from unclip_jax.inference.pipeline import TextEncoding
  from unclip_jax.models.clip import CLIP

  sds = jax.ShapeDtypeStruct
  b, l = batch, pipe.prior.num_embeddings
  ids = sds((b, l), jnp.int32)
  emb, enc = jax.eval_shape(lambda p, i: pipe.clip.apply({"params": p}, i, method=CLIP.encode_text),
                            common.abstract(pipe.clip_params), ids)
  text = TextEncoding(emb, enc, sds((b, l), jnp.bool_))
  key = jax.eval_shape(lambda: jax.random.key(0))
  null = lambda cfg: text.as_prior_cond() if cfg.null_text == "empty_prompt" else None  # same shapes
  s, e = pipe.decoder_size, emb.shape[-1]
  image_emb = sds((b, e), jnp.float32)
  stages = [("text", pipe._encode_text, (common.abstract(pipe.clip_params), ids)),
            ("prior", pipe._prior, (common.abstract(pipe.prior_params), text.as_prior_cond(), key, null(pipe.prior_cfg),
                                    None)),
            ("decoder", pipe._decoder, (common.abstract(pipe.decoder_params), pipe.decoder_cond(image_emb, text),
                                        sds((b, s, s, 3), jnp.float32), key, null(pipe.decoder_cfg), None, None))]
  if pipe.sr_cfg is not None:
    size = pipe.image_size
    stages.append(("super_res", pipe._super_res, (common.abstract(pipe.sr_first), common.abstract(pipe.sr_last),
                                                   sds((b, s, s, 3), jnp.float32), sds((b, size, size, 3),
                                                                                          jnp.float32), key)))
  rows = []
  for name, fn, fn_args in stages:
    t0 = time.perf_counter()
    lowered = fn.lower(*fn_args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    rows.append({"stage": name, "batch": b, "lower_s": t1 - t0, "compile_s": t2 - t1,
                 "xla_mem_bytes": common.compiled_memory_bytes(compiled)})
    print(f"[bench] compile {name}: lower {t1 - t0:.1f}s, compile {t2 - t1:.1f}s", file=sys.stderr, flush=True)
  return rows


def bench_ours(args, cfgs, batches) -> tuple[list[dict], dict]:
  import jax

  from unclip_jax.inference.pipeline import StageNoise

  info = common.device_info()
  dtype = args.dtype or common.default_dtype(info["platform"])
  with common.timed(f"ours: random init + pipeline ({args.size}, {dtype})"):
    pipe = build_pipeline(cfgs, dtype=dtype, param_dtype=args.param_dtype, seed=args.seed)
  with common.timed("ours: FLOP counts"):
    flops = stage_flops(pipe, batches[0], args.flops)
  per_image = sum(f["flops_per_image"] or 0.0 for f in flops.values()) or None
  sources = sorted({f["source"] for f in flops.values()})
  rows = []
  for b in batches:
    prompts = prompts_for(b)
    noise = StageNoise.from_key(jax.random.key(args.seed))
    compile_s: dict[str, float] = {}
    first = run_chain(pipe, prompts, noise, compile_s)
    for _ in range(args.warmup):
      run_chain(pipe, prompts, noise)
    runs = [run_chain(pipe, prompts, noise) for _ in range(args.repeats)]
    stages = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    total = statistics.median(sum(r.values()) for r in runs)
    if not any(compile_s.values()):
      print("[bench] warning: no compile events seen on the first call (jax.monitoring event names changed?); "
            "compile s is reported as unknown", file=sys.stderr)
      compile_s = {k: None for k in compile_s}
    label = dtype if args.param_dtype == "float32" else f"{dtype} (params {args.param_dtype})"
    rows.append({"impl": "unclip_jax", "batch": b, "dtype": label, "param_dtype": args.param_dtype,
                 "stages_s": stages, "total_s": total, "images_per_s": b / total,
                 "flops_per_image": per_image, "flops_source": "+".join(sources),
                 "mfu": common.mfu(per_image and per_image * b / total, info["peak_flops"]),
                 "peak_mem_bytes": common.device_peak_bytes(), "first_call_s": first, "compile_s": compile_s,
                 "first_call_total_s": sum(first.values()), "repeats": [sum(r.values()) for r in runs]})
    print(f"[bench] ours batch {b}: {total:.4f} s/batch, first call {sum(first.values()):.1f}s "
          f"(compile {sum(v or 0.0 for v in compile_s.values()):.1f}s)", file=sys.stderr, flush=True)
  ablations = run_ablations(pipe, batches[0], args) if args.ablations else []
  return rows, {"stage_flops": flops, "ablations": ablations}


# ---- ablations -----------------------------------------------------------------------------------------------------
def run_ablations(pipe, batch: int, args) -> list[dict]:
  """The decoder stage four ways, same UNet and conditioning: one jitted lax.scan with guidance batched as
  [uncond; cond] (the pipeline's way), the scan with uncond and cond as two UNet calls, a Python loop over a
  jitted single step (per-step dispatch, like a torch loop), and the pipeline's scan with XLA attention (on a CUDA
  GPU in bf16 the pipeline's "auto" attention is cuDNN flash attention; elsewhere the two rows are the same)."""
  import jax
  import jax.numpy as jnp

  from unclip_jax.stages import decoder as decoder_lib
  from unclip_jax.diffusion import samplers, schedules
  from unclip_jax.diffusion.gaussian import GaussianDiffusion
  from unclip_jax.models import layers
  from unclip_jax.stages import common as common_stage

  dc = pipe.decoder_cfg
  diffusion = GaussianDiffusion.from_config(dc.diffusion)
  settings = common_stage.sampler_settings(dc)
  steps = dc.sampling.steps
  text = pipe.encode_text(prompts_for(batch))
  emb = pipe.sample_prior(text, jax.random.key(1))
  params = pipe.decoder_params
  s = pipe.decoder_size
  x_T = jax.random.normal(jax.random.key(2), (batch, s, s, 3))
  rng = jax.random.key(3)

  def kwargs_of(p):
    return decoder_lib.decoder_cond(pipe.text_proj, p["text_proj"], image_emb=emb, text_emb=text.emb,
                                    text_enc=text.enc, text_mask=text.mask, guidance=True)

  def batched(p, x, r):
    return samplers.sample(decoder_lib.model_fn_for(pipe.unet, p["unet"], kwargs_of(p)), x, r,
                           diffusion=diffusion, steps=steps, settings=settings)

  def two_calls(p, x, r):
    kw = kwargs_of(p)
    half = lambda part: {k: v[:batch] if part == 0 else v[batch:] for k, v in kw.items()}
    fu, fc = (decoder_lib.model_fn_for(pipe.unet, p["unet"], half(i)) for i in (0, 1))

    def model_fn(xx, t):                               # called on [x; x]: uncond rows, then cond rows
      return jnp.concatenate([fu(xx[:batch], t[:batch]), fc(xx[batch:], t[batch:])])
    return samplers.sample(model_fn, x, r, diffusion=diffusion, steps=steps, settings=settings)

  table = schedules.step_table(diffusion.schedule, steps, settings.single_step_beta).as_scan_inputs()

  @jax.jit
  def one_step(p, x, step, r):
    fn = samplers.guided(decoder_lib.model_fn_for(pipe.unet, p["unet"], kwargs_of(p)), settings.guidance_scale,
                         3, diffusion.learned_variance)
    return samplers.sampler_step(fn, x, step, r, diffusion=diffusion, settings=settings)[0]

  steps_dev = [{k: jnp.asarray(v[i]) for k, v in table.items()} for i in range(len(table["t"]))]

  def python_loop(p, x, r):
    for step in steps_dev:
      x = one_step(p, x, step, r)
    return x

  def xla_attention(p, x, r):
    unet = pipe.unet.clone(attention="xla")
    return samplers.sample(decoder_lib.model_fn_for(unet, p["unet"], kwargs_of(p)), x, r,
                           diffusion=diffusion, steps=steps, settings=settings)

  auto = layers.resolve_attention(pipe.unet.attention, jnp.dtype(pipe.unet.dtype), pipe.unet.head_dim,
                                  has_bias=False)
  variants = [(f"jit + lax.scan, guidance batched [uncond; cond] (pipeline; attention {pipe.unet.attention} = "
               f"{auto})", jax.jit(batched)),
              ("jit + lax.scan, guidance as two UNet calls", jax.jit(two_calls)),
              ("Python loop over a jitted step, guidance batched", python_loop),
              ("jit + lax.scan, guidance batched, attention = xla", jax.jit(xla_attention))]
  rows, base = [], None
  for name, fn in variants:
    timer = common.CompileTimer()
    with timer:
      common.block(fn(params, x_T, rng))
    seconds, _ = common.median_seconds(lambda: common.block(fn(params, x_T, rng)), args.repeats, warmup=0)
    base = base or seconds
    rows.append({"variant": name, "batch": batch, "seconds": seconds, "vs_baseline": seconds / base,
                 "compile_s": timer.seconds})
    print(f"[bench] ablation {name}: {seconds:.4f}s", file=sys.stderr, flush=True)
  return rows


# ---- diffusers -----------------------------------------------------------------------------------------------------
def _text_proj_cls():
  try:                                                   # UnCLIPTextProjModel moved in diffusers 0.38
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
  except ImportError:
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
  return UnCLIPTextProjModel


def build_peer(cfgs, *, device: str, dtype: str, seed: int):
  """diffusers UnCLIPPipeline with torch-initialised random weights, built on `device` from our configs' diffusers
  equivalents (the converters' config writers), components assembled by hand."""
  import diffusers
  import torch
  import transformers

  from unclip_jax.convert import cli as convert
  from unclip_jax.convert import clip as convert_clip, prior as convert_prior, unet as convert_unet
  from unclip_jax.data import tokenizer as tok_lib
  from unclip_jax.stages import builders

  torch.manual_seed(seed)
  tdtype = getattr(torch, dtype)
  clip_cfg = builders.clip_config(cfgs["clip"].model)
  with torch.device(device):
    mods = dict(
        prior=diffusers.PriorTransformer.from_config(convert_prior.diffusers_config_from_model(cfgs["prior"].model)),
        text_proj=_text_proj_cls().from_config(convert_unet.diffusers_config_from_text_proj(cfgs["decoder"].model)),
        decoder=diffusers.UNet2DConditionModel.from_config(
            convert_unet.diffusers_config_from_unet(cfgs["decoder"].model)),
        super_res_first=diffusers.UNet2DModel.from_config(
            convert_unet.diffusers_config_from_unet(cfgs["super_res"].model)),
        super_res_last=diffusers.UNet2DModel.from_config(
            convert_unet.diffusers_config_from_unet(cfgs["super_res"].model)),
        text_encoder=transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig.from_dict(convert_clip.hf_config_from_config(clip_cfg))))
  mods = {k: m.to(dtype=tdtype).eval() for k, m in mods.items()}
  vocab, merges = tok_lib.load_vocab_and_merges()
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!",
                                         model_max_length=clip_cfg.text.context_length)
  sched = lambda cfg: diffusers.UnCLIPScheduler.from_config(convert.scheduler_config(cfg))
  pipe = diffusers.UnCLIPPipeline(tokenizer=tokenizer, prior_scheduler=sched(cfgs["prior"]),
                                  decoder_scheduler=sched(cfgs["decoder"]),
                                  super_res_scheduler=sched(cfgs["super_res"]), **mods)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def bench_peer(args, cfgs, batches) -> list[dict]:
  """Runs in the child process: the diffusers pipeline at each batch size."""
  import torch

  device = args.peer_device
  dtype = args.peer_dtype or ("float16" if device == "cuda" else "float32")
  threads = args.peer_threads if args.peer_threads is not None else (1 if device == "cpu" else 0)
  if threads > 0:
    torch.set_num_threads(threads)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with common.timed(f"diffusers: random init on {device} ({dtype})"):
    pipe = build_peer(cfgs, device=device, dtype=dtype, seed=args.seed)
  marks: dict[str, float] = {}

  def mark(name):
    def hook(module, inputs):
      if name not in marks:
        sync()
        marks[name] = time.perf_counter()
    return hook

  handles = [pipe.prior.register_forward_pre_hook(mark("prior")),
             pipe.text_proj.register_forward_pre_hook(mark("decoder")),
             pipe.super_res_first.register_forward_pre_hook(mark("super_res")),
             pipe.super_res_last.register_forward_pre_hook(mark("super_res"))]
  steps = {k: int(cfgs[k].sampling.steps) for k in ("prior", "decoder", "super_res")}

  def once(prompts):
    marks.clear()
    sync()
    t0 = time.perf_counter()
    pipe(prompts, prior_num_inference_steps=steps["prior"], decoder_num_inference_steps=steps["decoder"],
         super_res_num_inference_steps=steps["super_res"],
         prior_guidance_scale=float(cfgs["prior"].sampling.guidance_scale),
         decoder_guidance_scale=float(cfgs["decoder"].sampling.guidance_scale),
         generator=torch.Generator(device).manual_seed(args.seed), output_type="np")
    sync()
    end = time.perf_counter()
    return {"text": marks["prior"] - t0, "prior": marks["decoder"] - marks["prior"],
            "decoder": marks["super_res"] - marks["decoder"], "super_res": end - marks["super_res"]}

  rows = []
  for b in batches:
    prompts = prompts_for(b)
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    first = once(prompts)
    for _ in range(args.warmup):
      once(prompts)
    runs = [once(prompts) for _ in range(args.repeats)]
    total = statistics.median(sum(r.values()) for r in runs)
    rows.append({"impl": "diffusers", "batch": b, "dtype": dtype,
                 "stages_s": {k: statistics.median(r[k] for r in runs) for k in STAGES}, "total_s": total,
                 "images_per_s": b / total, "first_call_s": first, "first_call_total_s": sum(first.values()),
                 "peak_mem_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
                 "repeats": [sum(r.values()) for r in runs], "device": device,
                 "torch_threads": torch.get_num_threads()})
    print(f"[bench] diffusers batch {b}: {total:.4f} s/batch", file=sys.stderr, flush=True)
  for h in handles:
    h.remove()
  return rows


def run_peer_child(args, platform: str) -> tuple[list[dict], str | None]:
  """The diffusers rows from a child process on the device matching ours, or ([], why not)."""
  device = {"cpu": "cpu", "gpu": "cuda"}.get(platform)
  if device is None:
    return [], f"no torch backend for the {platform} platform in this benchmark"
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "peer.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--impl", "diffusers", "--peer-device", device,
           "--size", args.size, "--batch", ",".join(map(str, args.batches)), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--steps", args.steps, "--prior-guidance", str(args.prior_guidance),
           "--decoder-guidance", str(args.decoder_guidance), "--seed", str(args.seed), "--json", str(out)]
    if args.peer_dtype:
      cmd += ["--peer-dtype", args.peer_dtype]
    if args.peer_threads is not None:
      cmd += ["--peer-threads", str(args.peer_threads)]
    # The child never needs a jax accelerator backend: keep jax off the device torch is about to use.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
      return [], f"diffusers child exited with status {proc.returncode} (its stderr is above)"
    return json.loads(out.read_text())["results"], None


# ---- report --------------------------------------------------------------------------------------------------------
def _gib(x):
  return common.fmt(x, ".2f", 1 / 2 ** 30)


def throughput_table(rows: list[dict]) -> str:
  peer = {r["batch"]: r for r in rows if r["impl"] == "diffusers"}
  cells = []
  for r in rows:
    ratio = "1.00x (peer)" if r["impl"] == "diffusers" else (
        f"{r['images_per_s'] / peer[r['batch']]['images_per_s']:.2f}x" if r["batch"] in peer else "-")
    st = r["stages_s"]
    cells.append([r["impl"], r["batch"], r["dtype"], *(common.fmt(st[k], ".4f") for k in STAGES),
                  common.fmt(r["total_s"], ".4f"), common.fmt(r["images_per_s"], ".3f"),
                  common.fmt(r.get("flops_per_image"), ".4f", 1e-12), r.get("flops_source") or "-",
                  common.fmt(r.get("mfu"), ".1%"), _gib(r.get("peak_mem_bytes")),
                  common.fmt(r.get("first_call_total_s"), ".1f"), ratio])
  return common.markdown_table(THROUGHPUT_COLUMNS, cells)


def stage_table(ours: list[dict], flops: dict) -> str:
  cells = []
  for r in ours or [{"batch": "-", "compile_s": {}, "first_call_s": {}, "stages_s": {}}]:
    for k in STAGES:
      f = flops.get(k, {})
      cells.append([k, r["batch"], common.fmt(f.get("forwards_per_image"), "g"),
                    common.fmt(f.get("xla_flops_per_forward"), ".5g", 1e-9),
                    common.fmt(f.get("jaxpr_flops_per_forward"), ".5g", 1e-9),
                    common.fmt(f.get("flops_per_image"), ".5g", 1e-9), f.get("source", "-"),
                    common.fmt(r["compile_s"].get(k), ".2f"), common.fmt(r["first_call_s"].get(k), ".2f"),
                    common.fmt(r["stages_s"].get(k), ".4f")])
  return common.markdown_table(STAGE_COLUMNS, cells)


def compile_table(rows: list[dict]) -> str:
  return common.markdown_table(COMPILE_COLUMNS, [
      [r["stage"], r["batch"], common.fmt(r["lower_s"], ".1f"), common.fmt(r["compile_s"], ".1f"),
       _gib(r["xla_mem_bytes"])] for r in rows])


def ablation_table(rows: list[dict]) -> str:
  return common.markdown_table(ABLATION_COLUMNS, [
      [r["variant"], r["batch"], common.fmt(r["seconds"], ".4f"), f"{r['vs_baseline']:.2f}x",
       common.fmt(r["compile_s"], ".2f")] for r in rows])


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", choices=sorted(SIZES), default="karlo")
  p.add_argument("--batch", default=None, help="comma-separated batch sizes (default: karlo 1,8,32; tiny 2)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs after the first (compiling) call")
  p.add_argument("--steps", default="25,25,7", help="prior,decoder,super_res sampler steps")
  p.add_argument("--prior-guidance", type=float, default=4.0)
  p.add_argument("--decoder-guidance", type=float, default=8.0)
  p.add_argument("--dtype", default=None, help="our compute dtype (default: bfloat16 on accelerators, float32 CPU)")
  p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="storage dtype of our params (the bundle can store bf16)")
  p.add_argument("--peer-dtype", default=None, help="diffusers dtype (default: float16 on CUDA, float32 on CPU)")
  p.add_argument("--peer-threads", type=int, default=None,
                 help="torch intra-op threads for the peer (default: 1 on CPU, where torch's spinning pool "
                      "loses badly to any other load on the cores; 0 = torch's default)")
  p.add_argument("--impl", choices=("both", "ours", "diffusers"), default="both")
  p.add_argument("--no-peer", action="store_true", help="same as --impl ours")
  p.add_argument("--peer-device", default=None, help=argparse.SUPPRESS)
  p.add_argument("--flops", choices=("auto", "xla", "jaxpr"), default="auto",
                 help="FLOP source: XLA cost analysis (auto falls back to the jaxpr count) or the jaxpr count")
  p.add_argument("--flops-only", action="store_true",
                 help="only count our stages' FLOPs (abstract params: nothing allocated, nothing timed)")
  p.add_argument("--compile-only", action="store_true",
                 help="only lower and compile each stage per batch size (abstract params: nothing allocated or run)")
  p.add_argument("--ablations", action="store_true",
                 help="also time the decoder stage as scan+batched guidance, scan+two calls, Python loop")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  # Ours allocates on demand, so the peer child (which runs first, on the same device) has the memory.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.no_peer:
    args.impl = "ours"
  if args.repeats < 1 or args.warmup < 0:
    raise SystemExit("error: --repeats must be >= 1 and --warmup >= 0")
  try:
    args.batches = sorted(common.parse_ints(args.batch or DEFAULT_BATCH[args.size], "--batch"))
    steps = parse_steps(args.steps)
  except ValueError as e:
    raise SystemExit(f"error: {e}")
  cfgs = stage_configs(args.size, steps, args.prior_guidance, args.decoder_guidance)

  if args.flops_only:
    info = common.device_info()
    pipe = build_pipeline(cfgs, dtype=args.dtype or common.default_dtype(info["platform"]),
                          param_dtype=args.param_dtype, seed=args.seed, abstract=True)
    flops = stage_flops(pipe, args.batches[0], args.flops)
    total = sum(f["flops_per_image"] or 0.0 for f in flops.values())
    print(f"\n## FLOPs of our stages, size {args.size}, steps {args.steps}, batch {args.batches[0]}: "
          f"{total / 1e12:.2f} TFLOP per image\n")
    print(stage_table([], flops))
    if args.json:
      common.write_json(args.json, {"benchmark": "sample_throughput", "size": args.size, "steps": steps,
                                    "stage_flops": flops, "flops_per_image": total})
    return 0
  if args.compile_only:
    info = common.device_info()
    dtype = args.dtype or common.default_dtype(info["platform"])
    pipe = build_pipeline(cfgs, dtype=dtype, param_dtype=args.param_dtype, seed=args.seed, abstract=True)
    rows = [r for b in args.batches for r in compile_stages(pipe, b)]
    print(f"\n## compile of our stages, size {args.size}, steps {args.steps}, {dtype}, device {info['kind']} "
          f"({info['platform']}); per batch size: "
          + ", ".join(f"{b}: {sum(r['lower_s'] + r['compile_s'] for r in rows if r['batch'] == b):.1f} s"
                      for b in args.batches) + "\n")
    print(compile_table(rows))
    if args.json:
      common.write_json(args.json, {"benchmark": "sample_throughput", "size": args.size, "steps": steps,
                                    "device": info, "dtype": dtype, "compile": rows})
    return 0
  if args.impl == "diffusers":                           # the child process (or a peer-only run)
    if args.peer_device is None:
      import torch

      args.peer_device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench_peer(args, cfgs, args.batches)
    if args.json:
      common.write_json(args.json, {"benchmark": "sample_throughput", "results": rows})
    print(throughput_table(rows))
    return 0

  info = common.device_info()
  peer_rows, peer_note = [], "skipped (--no-peer)"
  if args.impl == "both":
    peer_rows, peer_note = run_peer_child(args, info["platform"])
  ours, extra = bench_ours(args, cfgs, args.batches)
  flops_per_image = ours[0]["flops_per_image"]
  for r in peer_rows:                                    # same models, same work per image
    r["flops_per_image"], r["flops_source"] = flops_per_image, ours[0]["flops_source"]
    r["mfu"] = common.mfu(flops_per_image and flops_per_image * r["images_per_s"], info["peak_flops"])
  rows = peer_rows + ours

  print(f"\n## unCLIP text-to-image, size {args.size}, steps prior/decoder/super-res {args.steps}, guidance "
        f"{args.prior_guidance}/{args.decoder_guidance}, device {info['kind']} ({info['platform']}), "
        f"peak {common.fmt(info['peak_flops'], '.0f', 1e-12)} TFLOP/s bf16")
  if peer_note:
    print(f"diffusers peer: {peer_note}")
  print("\n" + throughput_table(rows))
  print(f"\n### our stages (a forward = one model call on one row; guided stages run 2 rows per image; FLOPs "
        f"counted at batch {args.batches[0]})\n")
  print(stage_table(ours, extra["stage_flops"]))
  if extra["ablations"]:
    print(f"\n### decoder sampler ablations (batch {args.batches[0]}, {cfgs['decoder'].sampling.steps} steps)\n")
    print(ablation_table(extra["ablations"]))
  if args.json:
    common.write_json(args.json, {"benchmark": "sample_throughput", "size": args.size, "steps": steps,
                                  "guidance": {"prior": args.prior_guidance, "decoder": args.decoder_guidance},
                                  "device": info, "peer": peer_note, "results": rows, **extra})
  return 0


if __name__ == "__main__":
  sys.exit(main())
