"""The unCLIP text-to-image chain over a model bundle: text -> CLIP -> prior -> decoder -> upsampler(s).

  prompts ─tokenizer (host)─► ids [B, 77] ─CLIP text tower─► text_emb [B, E], text_enc [B, 77, D], mask [B, 77]
          ─prior (CFG on x̂0, best of n by cos with text_emb)─► image_emb [B, E]
          ─text_proj + decoder UNet (CFG on ε)─► [B, 64, 64, 3] ─super_res_first (+ super_res_last on the final
          step)─► [B, 256, 256, 3] in [-1, 1]

Each stage is one jitted function (one `lax.scan` over its steps, guidance batched as [uncond; cond]) compiled once
per batch shape. Randomness is explicit: `StageNoise` holds each stage's initial noise and step-noise key, so a run
can be replayed exactly (or fed the noise a peer implementation drew). `UnCLIP.generate` gives every output row its
own key, fold_in(fold_in(key(seed), prompt index), image index) (`StageNoise.from_row_keys`, `inference/batch.py`),
so an image depends on the seed, its prompt's index and its image index, not on the batch it was sampled in.
With `batch_invariant` (the default on CPU) every network also runs one row at a time (`row_by_row`: `lax.map` over
the rows inside the jitted stage), so a row's arithmetic has the same shapes, and its image the same bits, whatever
the batch size or device count; batched (the accelerator default), XLA picks kernels and summation orders by shape
and images agree across batch shapes only within float rounding.

The uncond branch of each guided stage sees what that model was trained with: the stage config's `null_text`
("zeros": zero text, every token masked; "empty_prompt": the CLIP encoding of "", as Karlo / diffusers).

Devices: the weights are replicated over a 1-D ("data",) mesh of `devices` (default: every local accelerator; one
device on CPU, where host "devices" share the same cores) and every batch whose rows divide evenly over them is
sharded by rows (else each device computes all of it). The noise is drawn the same way on any mesh, so the
images do not depend on the device count. The batched stages are traced under that mesh (its abstract form), so on
TPU the attention of the UNets, CLIP and the prior runs the Pallas splash kernel inside `shard_map` over the rows.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from unclip_jax.diffusion import samplers, schedules
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.inference.images import to_uint8
from unclip_jax.stages import builders, common
from unclip_jax.stages import decoder as decoder_stage, prior as prior_stage, upsampler as upsampler_stage

log = logging.getLogger(__name__)

Params = Any
SAMPLING_STAGES = ("prior", "decoder", "super_res")
REQUIRED_COMPONENTS = ("clip", "prior", "decoder")


def default_devices() -> list[jax.Device]:
  """Every local device of an accelerator backend; the first only on CPU (XLA:CPU already uses all cores in one
  device, and forced host "devices" would split the same cores)."""
  devices = jax.local_devices()
  return devices[:1] if devices[0].platform == "cpu" else list(devices)


def data_mesh(devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
  """1-D mesh ("data",) over `devices`, Auto axis type."""
  if not devices:
    raise ValueError("the pipeline needs at least one device")
  return jax.sharding.Mesh(np.asarray(list(devices)), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def default_batch_invariant(devices: Sequence[jax.Device]) -> bool:
  """Whether `UnCLIP(batch_invariant=None)` evaluates the networks one row at a time: on CPU devices yes (bitwise
  batch-invariant images at no measured cost; see `row_by_row`), on accelerators no (they need the batch)."""
  return all(d.platform == "cpu" for d in devices)


def row_by_row(fn, shared: int, mesh: jax.sharding.Mesh):
  """fn(*shared_args, *row_args) -> the same function computed one row at a time (traceable; jit the caller).

  Every leaf of row_args has the batch as its leading axis [B, ...] (None leaves allowed); `jax.lax.map` calls fn on
  [1, ...] slices and stacks its outputs [B, ...]. A row's arithmetic then has one fixed shape whatever B is, and so
  whatever the batch size, device count, host count or resume point (XLA:CPU picks kernels and summation orders by
  shape, e.g. YNNPACK reductions for larger batches only). When B divides over the mesh's "data" axis the rows are
  split over its devices with `jax.shard_map` (each device maps over its own rows); else every device maps over all.
  """
  P = jax.sharding.PartitionSpec

  def one_by_one(*args):
    fixed, rows = args[:shared], args[shared:]

    def body(row):
      return jax.tree.map(lambda x: x[0], fn(*fixed, *jax.tree.map(lambda x: x[None], row)))
    return jax.lax.map(body, rows)

  def call(*args):
    b = jax.tree.leaves(args[shared:])[0].shape[0]
    if mesh.size > 1 and b % mesh.size == 0:
      return jax.shard_map(one_by_one, mesh=mesh, in_specs=(P(),) * shared + (P("data"),) * (len(args) - shared),
                           out_specs=P("data"))(*args)
    return one_by_one(*args)
  return call


def with_sampling_overrides(cfg: mlc.ConfigDict, overrides: Mapping[str, Any] | None) -> mlc.ConfigDict:
  """A copy of a stage config with `sampling.<key>` (and the prior's `num_candidates`) replaced.

  Raises KeyError naming an unknown key (a misspelt setting is never ignored)."""
  cfg = mlc.ConfigDict(cfg.to_dict())
  ints = ("resample_jumps",)
  for key, value in (overrides or {}).items():
    if value is None:
      continue
    if key == "num_candidates" and "num_candidates" in cfg:
      cfg.num_candidates = int(value)
    elif key in cfg.sampling:
      cfg.sampling[key] = str(value) if key == "steps" else int(value) if key in ints else value
    else:
      raise KeyError(f"unknown {cfg.stage} sampling setting {key!r}; known: {sorted(cfg.sampling)}")
  return cfg


def num_steps(cfg) -> int:
  """How many sampler steps a stage config's respacing spec visits."""
  table = schedules.step_table(GaussianDiffusion.from_config(cfg.diffusion).schedule, cfg.sampling.steps,
                               cfg.sampling.single_step_beta)
  return len(table.timesteps)


@jax.jit
def _row_initial_noise(keys: jax.Array, like: jax.ShapeDtypeStruct | jax.Array) -> jax.Array:
  return samplers.row_normal(jax.vmap(lambda k: jax.random.fold_in(k, 1 << 20))(keys), like.shape[1:])


def initial_noise(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A stage's x_T [B, ...] drawn from its key: normal(fold_in(rng, 2^20), shape) for one key; for per-row keys
  [B], row b = normal(fold_in(rng[b], 2^20), shape[1:])."""
  if samplers.is_row_keys(rng):
    return _row_initial_noise(rng, jnp.zeros((rng.shape[0],) + tuple(shape[1:]), jnp.float32))
  return jax.random.normal(jax.random.fold_in(rng, 1 << 20), shape)


@dataclasses.dataclass
class StageNoise:
  """All the randomness of one batch. x_T None = drawn from the stage's key; rng = that stage's step-noise key
  (step i of a stage draws `samplers.step_noise(rng, i, shape)`; the prior splits its key as `prior_stage.sample`)."""
  prior_rng: jax.Array
  decoder_rng: jax.Array
  super_res_rng: jax.Array
  decoder_x_T: jax.Array | None = None
  super_res_x_T: jax.Array | None = None
  prior_x_T: jax.Array | None = None

  @classmethod
  def from_key(cls, key: jax.Array) -> "StageNoise":
    k = jax.random.split(key, 3)
    return cls(prior_rng=k[0], decoder_rng=k[1], super_res_rng=k[2])

  @classmethod
  def from_row_keys(cls, keys: jax.Array) -> "StageNoise":
    """Per-row randomness: keys [B] -> every stage's keys [B] (row b's stages split keys[b] in 3), so each row's
    image is a function of its own key only, whatever else shares its batch or device."""
    k = _split3(keys)
    return cls(prior_rng=k[:, 0], decoder_rng=k[:, 1], super_res_rng=k[:, 2])


_split3 = jax.jit(jax.vmap(lambda k: jax.random.split(k, 3)))


@dataclasses.dataclass
class TextEncoding:
  """CLIP text conditioning of a batch: emb [B, E], enc [B, L, D] (token states), mask [B, L] bool, and the token
  ids [B, L] int32 they came from (read by a decoder with the paper's GLIDE + CLIP pathway; None when unknown)."""
  emb: jax.Array
  enc: jax.Array
  mask: jax.Array
  ids: jax.Array | None = None

  def as_prior_cond(self) -> common.TextCond:
    return common.TextCond(self.emb, self.enc, self.mask)

  def take(self, index) -> "TextEncoding":
    return TextEncoding(self.emb[index], self.enc[index], self.mask[index],
                        None if self.ids is None else self.ids[index])

  def repeat(self, n: int) -> "TextEncoding":
    """Every row repeated n times ([B] -> [n·B], row-major as jnp.repeat)."""
    rep = lambda x: None if x is None else jnp.repeat(x, n, axis=0)
    return TextEncoding(rep(self.emb), rep(self.enc), rep(self.mask), rep(self.ids))


@dataclasses.dataclass
class Generation:
  """Output of `UnCLIP.generate`: images in prompt order (prompt-major, then image index)."""
  images: np.ndarray               # [N, H, W, 3] uint8
  prompt_index: list[int]          # which prompt each image is for
  clip_scores: list[float | None]  # 100·cos(text, image) of the kept candidate (reranking), else None
  settings: dict[str, Any]         # per-stage sampler settings, seed, batch size


class UnCLIP:
  """A loaded bundle with one jitted sampler per stage.

  Args:
    components: {"clip", "prior", "decoder", "super_res_first"[, "super_res_last"]: (stage config, params)}; the
      upsampler is optional (then images stay at the decoder's size).
    sampling: per-stage overrides {"prior" | "decoder" | "super_res": {"steps": "25", "sampler": "ddim", "eta": 0.0,
      "guidance_scale": 4.0, ...}}; the prior also takes "num_candidates".
    dtype: compute dtype of every model (params stay float32).
    progress: show a progress bar per stage (from inside the jitted scans; results are unchanged).
    devices: where to run (default `default_devices()`): weights replicated, batches sharded by rows when the
      row count is a multiple of len(devices).
    batch_invariant: evaluate every network one row at a time (`row_by_row`), so a row's image is bitwise the same
      whatever the batch size or device count (with per-row keys); default `default_batch_invariant` (CPU: on).
  """

  def __init__(self, components: Mapping[str, tuple[mlc.ConfigDict, Params]], *,
               sampling: Mapping[str, Mapping[str, Any]] | None = None, dtype: str = "float32",
               progress: bool = False, devices: Sequence[jax.Device] | None = None,
               batch_invariant: bool | None = None):
    from unclip_jax.data import tokenizer as tokenizer_lib

    missing = [c for c in REQUIRED_COMPONENTS if c not in components]
    if missing:
      raise ValueError(f"the pipeline needs components {list(REQUIRED_COMPONENTS)}; missing {missing}")
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_STAGES))
    if unknown:
      raise KeyError(f"unknown sampling stage(s) {unknown}; choose from {SAMPLING_STAGES}")
    self.dtype = jnp.dtype(dtype)
    self.progress = progress
    self.mesh = data_mesh(default_devices() if devices is None else devices)
    self.batch_invariant = (default_batch_invariant(list(self.mesh.devices.flat)) if batch_invariant is None
                            else bool(batch_invariant))
    components = {name: (cfg, self._replicated(params)) for name, (cfg, params) in components.items()}

    clip_cfg, self.clip_params = components["clip"]
    self.clip = builders.clip(clip_cfg.model, dtype=self.dtype)
    if self.clip.config.text is None:
      raise ValueError("the bundle's clip component has no text tower")
    self.tokenizer = tokenizer_lib.CLIPTokenizer(context_length=self.clip.config.text.context_length)

    self.prior_cfg = with_sampling_overrides(components["prior"][0], sampling.get("prior"))
    self.prior_params = components["prior"][1]
    self.prior = prior_stage.build(self.prior_cfg, dtype=self.dtype).prior
    if self.prior.num_embeddings != self.clip.config.text.context_length:
      raise ValueError(f"prior expects {self.prior.num_embeddings} text tokens but CLIP's context length is "
                       f"{self.clip.config.text.context_length}")

    self.decoder_cfg = with_sampling_overrides(components["decoder"][0], sampling.get("decoder"))
    pathway = self.decoder_cfg.model.text_encoder
    if pathway not in ("text_proj", "glide_clip"):
      raise ValueError("the unCLIP pipeline conditions the decoder on CLIP embeddings (text_encoder text_proj or "
                       f"glide_clip); this decoder uses the {pathway!r} text pathway")
    self.decoder_params = components["decoder"][1]
    decoder = decoder_stage.build(self.decoder_cfg, dtype=self.dtype)
    # glide_clip (the paper's decoder) reads the CLIP tokenizer's ids: its vocabulary must hold them
    self.unet, self.text_proj, self.decoder_text_encoder = decoder.unet, decoder.text_proj, decoder.text_encoder
    if pathway == "glide_clip" and int(self.decoder_cfg.model.n_vocab) < self.clip.config.text.vocab_size:
      raise ValueError(f"the decoder's GLIDE transformer has n_vocab={self.decoder_cfg.model.n_vocab} but the "
                       f"pipeline feeds it CLIP token ids (vocabulary {self.clip.config.text.vocab_size})")

    self.sr_cfg = None
    if "super_res_first" in components:
      self.sr_cfg = with_sampling_overrides(components["super_res_first"][0], sampling.get("super_res"))
      self.sr_first = components["super_res_first"][1]
      self.sr_last = components["super_res_last"][1] if "super_res_last" in components else None
      if self.sr_last is None:
        self.sr_cfg.last_step_model = False
      self.sr_unet = upsampler_stage.build(self.sr_cfg, dtype=self.dtype).unet
    elif sampling.get("super_res"):
      raise ValueError("super_res sampling settings given but the bundle has no super_res_first component")
    self._build()

  # ---- construction ------------------------------------------------------------------------------------------------
  @classmethod
  def from_bundle(cls, path: str | pathlib.Path, *, verify: bool = True, **kwargs) -> "UnCLIP":
    """Loads every component of a bundle folder (see `unclip_jax.bundle`), checked against the sha256 record in
    its bundle.json unless `verify=False`."""
    from unclip_jax import bundle, paths

    path = paths.as_path(path)
    if not path.is_dir():
      raise FileNotFoundError(f"model bundle not found: {path}")
    present = bundle.list_components(path)
    missing = [c for c in REQUIRED_COMPONENTS if c not in present]
    if missing:
      raise FileNotFoundError(f"bundle {path} lacks component(s) {missing} (has {present}); a text-to-image "
                              f"bundle needs {list(REQUIRED_COMPONENTS)} and optionally super_res_first/last")
    return cls({name: bundle.load_component(path, name, verify=verify) for name in present}, **kwargs)

  def _replicated(self, params: Params) -> Params:
    """Params -> a copy on every device of the mesh (abstract ShapeDtypeStruct leaves are left as they are)."""
    whole = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, whole), params)

  def _rows(self, tree):
    """Batch inputs -> sharded by rows over the mesh where the leading size divides evenly, else replicated
    (keys and scalars are replicated). None leaves stay None."""
    n = self.mesh.size
    rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def put(x):
      shape = np.shape(x)
      return jax.device_put(x, rows if shape and shape[0] % n == 0 else whole)
    return jax.tree.map(put, tree)

  def _under_mesh(self, fn):
    """`fn` traced under the pipeline's (abstract) mesh, so that a layer which must know it can: the Pallas splash
    attention of the UNets, CLIP towers and prior on TPU runs inside `jax.shard_map` over the rows
    (`models.layers.splash_attention`)."""
    mesh = self.mesh.abstract_mesh

    @functools.wraps(fn)
    def traced(*args):
      with jax.sharding.use_abstract_mesh(mesh):
        return fn(*args)
    return traced

  def _bar(self, cfg, desc: str):
    return samplers.ProgressBar(num_steps(cfg), desc=desc) if self.progress else None

  def _build(self) -> None:
    from unclip_jax.models.clip import CLIP

    clip = self.clip
    per_row = (lambda fn, shared: row_by_row(fn, shared, self.mesh)) if self.batch_invariant else (lambda fn, _: fn)
    # Batched stages are traced under the mesh (the splash kernel of the UNets, CLIP towers and prior on TPU).
    batched = per_row if self.batch_invariant else (lambda fn, _: self._under_mesh(fn))
    self._encode_text = jax.jit(batched(lambda p, ids: clip.apply({"params": p}, ids, method=CLIP.encode_text), 1))
    if clip.config.vision is not None:
      self._encode_image = jax.jit(batched(lambda p, px: clip.apply({"params": p}, px, method=CLIP.encode_image)[0],
                                           1))

    pc = self.prior_cfg
    prior_diffusion = GaussianDiffusion.from_config(pc.diffusion)
    prior_settings = common.sampler_settings(pc)
    prior_bar = self._bar(pc, "prior")

    n = int(pc.num_candidates)

    def prior_fn(params, cond, rng, null, x_T):
      return prior_stage.sample(params, cond, rng, model=self.prior, diffusion=prior_diffusion, steps=pc.sampling.steps,
                              settings=prior_settings, num_candidates=n, null_cond=null, x_T=x_T, progress=prior_bar)
    prior_rows = per_row(lambda params, cond, rng, null, x_T: prior_fn(params, cond, rng, null,
                                                                       None if x_T is None else x_T[0]), 1)

    def prior_any(params, cond, rng, null, x_T):
      if not (self.batch_invariant and samplers.is_row_keys(rng)):   # one key: the whole-batch draw
        return self._under_mesh(prior_fn)(params, cond, rng, null, x_T)
      if x_T is not None:                                          # [n·B, E] candidate-major -> per row [B, n, E]
        x_T = jnp.swapaxes(x_T.reshape(n, rng.shape[0], -1), 0, 1)
      return prior_rows(params, cond, rng, null, x_T)
    self._prior = jax.jit(prior_any)

    dc = self.decoder_cfg
    dec_diffusion = GaussianDiffusion.from_config(dc.diffusion)
    dec_settings = decoder_stage.settings_for(dc)
    dec_bar = self._bar(dc, "decoder")
    self._dec_diffusion, self._dec_steps = dec_diffusion, dc.sampling.steps

    def decoder_fn(params, cond, x_T, rng, null, inpaint_image, inpaint_mask):
      return decoder_stage.sample(params, cond, x_T, rng, unet=self.unet, text_proj=self.text_proj,
                                text_encoder=self.decoder_text_encoder,
                                diffusion=dec_diffusion, steps=dc.sampling.steps, settings=dec_settings,
                                null_text=null, inpaint_image=inpaint_image, inpaint_mask=inpaint_mask,
                                inpaint_method=dc.sampling.inpaint_method,
                                resample_jumps=int(dc.sampling.resample_jumps),
                                image_conditioning=bool(dc.image_conditioning), progress=dec_bar)
    self._decoder = jax.jit(self._keyed(self._under_mesh(decoder_fn), per_row(decoder_fn, 1), rng_arg=3))

    def invert_fn(params, cond, x0):
      kwargs = self.decoder_kwargs(params, cond, guidance=False)
      model_fn = decoder_stage.model_fn_for(self.unet, params["unet"], kwargs)
      return samplers.ddim_invert(model_fn, x0, diffusion=dec_diffusion, steps=dc.sampling.steps)
    self._invert = jax.jit(per_row(invert_fn, 1) if self.batch_invariant else self._under_mesh(invert_fn))

    if self.sr_cfg is not None:
      sc = self.sr_cfg
      sr_diffusion = GaussianDiffusion.from_config(sc.diffusion)
      sr_settings = common.sampler_settings(sc)
      sr_bar = self._bar(sc, "super-res")

      def sr_fn(first, last, low_res, x_T, rng):
        return upsampler_stage.sample(first, last, low_res, x_T, rng, unet=self.sr_unet, diffusion=sr_diffusion,
                                    steps=sc.sampling.steps, settings=sr_settings,
                                    resize_method=sc.model.resize_method, progress=sr_bar)
      self._super_res = jax.jit(self._keyed(self._under_mesh(sr_fn), per_row(sr_fn, 2), rng_arg=4))

  def _keyed(self, batched, rows, rng_arg: int):
    """`rows` (the row-by-row version) when this pipeline is batch invariant and args[rng_arg] holds per-row keys;
    else `batched` (one key is a whole-batch draw, which a row-by-row call would repeat in every row)."""
    def call(*args):
      return (rows if self.batch_invariant and samplers.is_row_keys(args[rng_arg]) else batched)(*args)
    return call

  def with_sampling(self, **stages: Mapping[str, Any]) -> "UnCLIP":
    """A pipeline sharing these weights whose named stages use other sampler settings, e.g.
    `pipe.with_sampling(decoder={"sampler": "ddim", "eta": 0.0})`; built once per distinct setting and cached."""
    unknown = sorted(set(stages) - set(SAMPLING_STAGES))
    if unknown:
      raise KeyError(f"unknown sampling stage(s) {unknown}; choose from {SAMPLING_STAGES}")
    key = repr(sorted((k, sorted(v.items())) for k, v in stages.items()))
    cache = self.__dict__.setdefault("_variants", {})
    if key not in cache:
      clone = copy.copy(self)
      clone._variants = {}
      for stage, overrides in stages.items():
        attr = {"prior": "prior_cfg", "decoder": "decoder_cfg", "super_res": "sr_cfg"}[stage]
        if getattr(self, attr) is None:
          raise ValueError(f"the bundle has no {stage} stage")
        setattr(clone, attr, with_sampling_overrides(getattr(self, attr), overrides))
      clone._build()
      cache[key] = clone
    return cache[key]

  # ---- sizes -------------------------------------------------------------------------------------------------------
  @property
  def decoder_size(self) -> int:
    return int(self.decoder_cfg.model.image_size)

  @property
  def image_size(self) -> int:
    """The final output side (the upsampler's, else the decoder's)."""
    return int(self.sr_cfg.model.image_size) if self.sr_cfg is not None else self.decoder_size

  @property
  def has_image_encoder(self) -> bool:
    return self.clip.config.vision is not None

  def settings(self) -> dict[str, Any]:
    """The sampler settings every stage runs with (for the per-image JSON)."""
    out = {"prior": dict(self.prior_cfg.sampling.to_dict(), num_candidates=int(self.prior_cfg.num_candidates),
                         null_text=self.prior_cfg.null_text),
           "decoder": dict(self.decoder_cfg.sampling.to_dict(), null_text=self.decoder_cfg.null_text)}
    if self.sr_cfg is not None:
      out["super_res"] = dict(self.sr_cfg.sampling.to_dict(), last_step_model=bool(self.sr_cfg.last_step_model))
    out["batch_invariant"] = self.batch_invariant
    return out

  # ---- stages ------------------------------------------------------------------------------------------------------
  def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
    """CLIP text encodings of a list of prompts (unknown characters are byte-encoded; long prompts truncated)."""
    if isinstance(prompts, str):
      prompts = [prompts]
    ids, mask = self.tokenizer.tokenize(list(prompts))
    emb, enc = self._encode_text(self.clip_params, self._rows(jnp.asarray(ids)))
    return TextEncoding(emb, enc, self._rows(jnp.asarray(mask)), self._rows(jnp.asarray(ids, jnp.int32)))

  def encode_image(self, images: Sequence[np.ndarray]) -> jax.Array:
    """CLIP image embeddings [B, E] of uint8 RGB images of any size (CLIP preprocessing: resize, centre crop)."""
    from unclip_jax.data import image_processing

    if not self.has_image_encoder:
      raise ValueError("the bundle's clip component has no image tower (needed for variations, interpolation, "
                       "text diffs and reranking)")
    size = self.clip.config.vision.image_size
    return self._encode_image(self.clip_params, self._rows(jnp.asarray(image_processing.preprocess(
        images, size=size, crop_size=size))))

  def _null(self, cfg, batch: int) -> TextEncoding | None:
    if cfg.null_text != "empty_prompt":
      return None
    return self.encode_text([""]).repeat(batch)

  def sample_prior(self, text: TextEncoding, rng: jax.Array, x_T: jax.Array | None = None) -> jax.Array:
    """CLIP image embeddings [B, E] for the text (x_T: [num_candidates·B, E], candidate-major)."""
    null = self._null(self.prior_cfg, text.emb.shape[0])
    return self._prior(self.prior_params, *self._rows((text.as_prior_cond(), rng,
                                                       None if null is None else null.as_prior_cond(), x_T)))

  def decoder_cond(self, image_emb: jax.Array, text: TextEncoding
                   ) -> decoder_stage.DecoderCond | decoder_stage.GlideClipCond:
    """The decoder's raw conditioning: CLIP text states and embeddings (text_proj), or the caption's token ids and
    mask (glide_clip, the paper's decoder), with the image embeddings."""
    if self.decoder_text_encoder is not None:
      if text.ids is None:
        raise ValueError("this decoder (text_encoder glide_clip) reads the caption's token ids: encode the text "
                         "with encode_text")
      return decoder_stage.GlideClipCond(image_emb, text.ids, text.mask)
    return decoder_stage.DecoderCond(image_emb, text.emb, text.enc, text.mask)

  def decoder_kwargs(self, params, cond, guidance: bool | int) -> dict:
    """The UNet's keyword arguments for a raw decoder conditioning (traceable)."""
    return decoder_stage.unet_kwargs(params, cond, text_proj=self.text_proj, text_encoder=self.decoder_text_encoder,
                                     guidance=guidance, image_conditioning=bool(self.decoder_cfg.image_conditioning))

  def decode(self, image_emb: jax.Array, text: TextEncoding, rng: jax.Array, x_T: jax.Array | None = None, *,
             inpaint_image: jax.Array | None = None, inpaint_mask: jax.Array | None = None) -> jax.Array:
    """Decoder images [B, s, s, 3] in [-1, 1] (s = decoder size) from image embeddings and text."""
    b = image_emb.shape[0]
    if x_T is None:
      x_T = initial_noise(rng, (b, self.decoder_size, self.decoder_size, 3))
    null = self._null(self.decoder_cfg, b)
    null = None if null is None else null.as_prior_cond()
    return self._decoder(self.decoder_params, *self._rows((self.decoder_cond(image_emb, text), x_T, rng, null,
                                                           inpaint_image, inpaint_mask)))

  def invert(self, images: jax.Array, image_emb: jax.Array, text: TextEncoding) -> jax.Array:
    """DDIM (η = 0) inversion of decoder-size images [B, s, s, 3] in [-1, 1] -> x_T, conditioned on image_emb."""
    return self._invert(self.decoder_params, *self._rows((self.decoder_cond(image_emb, text), images)))

  def upsample(self, low_res: jax.Array, rng: jax.Array, x_T: jax.Array | None = None) -> jax.Array:
    """Super-resolution of decoder outputs (identity when the bundle has no upsampler)."""
    if self.sr_cfg is None:
      return low_res
    if x_T is None:
      size = self.image_size
      x_T = initial_noise(rng, (low_res.shape[0], size, size, 3))
    return self._super_res(self.sr_first, self.sr_last, *self._rows((low_res, x_T, rng)))

  def run(self, text: TextEncoding, noise: StageNoise, *, image_emb: jax.Array | None = None) -> dict[str, jax.Array]:
    """The whole chain for one batch: {"image_emb", "low_res", "images"} (images in [-1, 1])."""
    if image_emb is None:
      image_emb = self.sample_prior(text, noise.prior_rng, noise.prior_x_T)
    low_res = self.decode(image_emb, text, noise.decoder_rng, noise.decoder_x_T)
    images = self.upsample(low_res, noise.super_res_rng, noise.super_res_x_T)
    return {"image_emb": image_emb, "low_res": low_res, "images": images}

  # ---- text to image -----------------------------------------------------------------------------------------------
  def generate(self, prompts: Sequence[str], *, seed: int = 0, images_per_prompt: int = 1, batch_size: int = 8,
               candidates: int = 1) -> Generation:
    """Text to images: `images_per_prompt` images per prompt, prompt-major order.

    candidates > 1 draws that many images per output and keeps the one with the highest CLIP score with its
    prompt (DALL-E 2's reranking; needs the clip component's image tower). Batches of `batch_size` sampled rows
    (the last one padded, so each stage compiles once). Image k of prompt p draws from
    fold_in(fold_in(key(seed), p), k) only (`inference/batch.py`), so it does not depend on the batch size, the
    devices or the other prompts (bitwise with `batch_invariant`, the CPU default; else bitwise for one batch shape
    and within float rounding across batch shapes).
    """
    from unclip_jax.inference import batch

    prompts = list(prompts)
    if not prompts:
      raise ValueError("no prompts given")
    if any(not isinstance(p, str) for p in prompts):
      raise TypeError("prompts must be strings")
    for name, v in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size), ("candidates", candidates)):
      if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    rows = [(p, k) for p in range(len(prompts)) for k in range(images_per_prompt)]
    out = batch.sample_rows(self, [prompts[p] for p, _ in rows], [p for p, _ in rows], [k for _, k in rows],
                            seed=seed, batch_size=batch_size, candidates=candidates)
    return Generation(images=out.images, prompt_index=[p for p, _ in rows], clip_scores=out.clip_scores,
                      settings=dict(self.settings(), seed=seed, batch_size=batch_size, candidates=candidates))
