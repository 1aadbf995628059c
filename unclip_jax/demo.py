"""`python -m unclip_jax.demo`: a Gradio web demo of the text-to-image chain and the image manipulations.

  pip install -e ".[demo]"
  python -m unclip_jax.demo [--bundle B] [--host 127.0.0.1] [--port 7860]

Tabs: text -> images, variations, interpolation (strip + animated GIF), text diff, inpainting (mask drawn in the
page). Without --bundle the model embedded in the package is used, so it runs offline. Every tab's programs are
compiled (or read from the persistent compilation cache) before the server starts, requests run one at a time
(queued), and the text tab's images equal `python -m unclip_jax.sample` for the same prompt, seed and settings.
Uploads and outputs go to a temporary folder ($GRADIO_TEMP_DIR, a fresh one by default).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import contextvars
import copy
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from unclip_jax.inference.pipeline import UnCLIP

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a red circle on a white background"
SECOND_PROMPT = "a blue square on a yellow background"
MAX_STEPS = 1000
MAX_IMAGES = 8
MAX_CANDIDATES = 8
MAX_FRAMES = 16
MAX_GUIDANCE = 50.0
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 1000
_STEPS_RE = re.compile(r"^(ddim)?(\d+)$")


class DemoInputError(ValueError):
  """Bad input from the page: its message is shown there (as a gr.Error)."""


# ---- input checks (no gradio needed) ---------------------------------------------------------------------------------
def check_prompt(text: Any, what: str = "prompt") -> str:
  """A non-empty prompt (stripped) of at most MAX_PROMPT_CHARS characters."""
  text = "" if text is None else str(text).strip()
  if not text:
    raise DemoInputError(f"The {what} is empty: type what the image should show, e.g. \"{DEFAULT_PROMPT}\".")
  if len(text) > MAX_PROMPT_CHARS:
    raise DemoInputError(f"The {what} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} please.")
  return text


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
  """An integer in [lo, hi] (floats with no fraction are accepted: gr.Number sends floats)."""
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise DemoInputError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.") from None
  if not np.isfinite(f) or f != int(f):
    raise DemoInputError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
  if not lo <= int(f) <= hi:
    raise DemoInputError(f"{name} must be between {lo} and {hi}, got {int(f)}.")
  return int(f)


def check_float(value: Any, name: str, lo: float, hi: float) -> float:
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise DemoInputError(f"{name} must be a number between {lo} and {hi}, got {value!r}.") from None
  if not (np.isfinite(f) and lo <= f <= hi):
    raise DemoInputError(f"{name} must be between {lo} and {hi}, got {value!r}.")
  return f


def check_steps(value: Any, name: str) -> str:
  """A sampler step count ("25", or "ddim50" for DDIM's even spacing) with 1..MAX_STEPS steps -> the spec."""
  text = str(value).strip().lower() if value is not None else ""
  if text.endswith(".0"):
    text = text[:-2]
  m = _STEPS_RE.match(text)
  if not m:
    raise DemoInputError(f"{name} must be a step count between 1 and {MAX_STEPS} (e.g. 25, or ddim50), "
                         f"got {value!r}.")
  if not 1 <= int(m.group(2)) <= MAX_STEPS:
    raise DemoInputError(f"{name} must be between 1 and {MAX_STEPS}, got {int(m.group(2))}.")
  return f"{m.group(1) or ''}{int(m.group(2))}"


def to_rgb(arr: np.ndarray) -> np.ndarray:
  """uint8 image [H, W], [H, W, 3] or [H, W, 4] (alpha composited over white) -> [H, W, 3]."""
  arr = np.asarray(arr)
  if arr.dtype != np.uint8:
    arr = np.clip(arr, 0, 255).astype(np.uint8)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
    raise DemoInputError(f"expected an image, got an array of shape {arr.shape}")
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  if arr.shape[-1] == 4:
    a = arr[..., 3:].astype(np.float32) / 255.0
    arr = np.round(arr[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)
  return arr


def read_image(value: Any, what: str) -> np.ndarray:
  """An uploaded image (a file path from gr.Image(type="filepath"), a PIL image or an array) -> uint8 RGB."""
  from PIL import Image

  if value is None or (isinstance(value, str) and not value):
    raise DemoInputError(f"Upload {what} first (or send one from the text -> images tab).")
  if isinstance(value, (str, pathlib.Path)):
    try:
      with Image.open(value) as im:
        return np.asarray(im.convert("RGB"))
    except Exception:
      raise DemoInputError(f"The file given as {what} is not an image this demo can read "
                           f"({pathlib.Path(value).name}); upload a PNG or JPEG.") from None
  if isinstance(value, Image.Image):
    return np.asarray(value.convert("RGB"))
  return to_rgb(value)


def editor_mask(editor: Any, mask_upload: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """The inpainting inputs -> (image uint8 [H, W, 3], known bool [H, W]).

  editor: gr.ImageEditor's value {"background", "layers", "composite"}: the pixels painted on any layer are the
  region to fill (unknown); everything else is kept. mask_upload (optional, replaces the painting): a mask image of
  the image's size, white = keep, black = fill.
  """
  if not isinstance(editor, dict) or editor.get("background") is None:
    raise DemoInputError("Upload an image to inpaint (or send one from the text -> images tab).")
  background = np.asarray(editor["background"])
  image = to_rgb(background)
  h, w = image.shape[:2]
  if mask_upload is not None and not (isinstance(mask_upload, str) and not mask_upload):
    m = read_image(mask_upload, "the mask")
    if m.shape[:2] != (h, w):
      raise DemoInputError(f"The mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}: upload a mask of the "
                           f"image's size (white = keep, black = fill).")
    known = m.mean(axis=-1) > 127
  else:
    known = np.ones((h, w), bool)
    for layer in editor.get("layers") or []:
      if layer is None:
        continue
      layer = np.asarray(layer)
      if layer.shape[:2] != (h, w):
        raise DemoInputError(f"The painted mask is {layer.shape[1]}x{layer.shape[0]} but the image is {w}x{h}; "
                             f"clear the canvas and paint again.")
      painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else np.asarray(to_rgb(layer)).any(-1)
      known &= ~painted
  if known.all():
    raise DemoInputError("Nothing to fill: paint over the region to replace (or upload a mask: white = keep, "
                         "black = fill).")
  return image, known


def stage_overrides(settings: dict[str, dict[str, Any]], form: dict[str, dict[str, Any]]) -> dict[str, dict]:
  """The form's per-stage values that differ from the pipeline's `settings()` (so the defaults reuse its programs)."""
  out: dict[str, dict[str, Any]] = {}
  for stage, values in form.items():
    if stage not in settings:
      continue
    for key, value in values.items():
      current = settings[stage].get(key)
      same = str(current) == str(value) if key == "steps" else current is not None and float(current) == float(value)
      if not same:
        out.setdefault(stage, {})[key] = value
  return out


def write_gif(frames: np.ndarray, path: pathlib.Path, seconds: float = 2.0) -> pathlib.Path:
  """uint8 frames [N, H, W, 3] -> an animated GIF that plays forward and back, looping."""
  from PIL import Image

  seq = list(frames) + list(frames[-2:0:-1])
  ims = [Image.fromarray(f).resize((max(f.shape[1], 256), max(f.shape[0], 256)), Image.NEAREST) for f in seq]
  ims[0].save(path, save_all=True, append_images=ims[1:], loop=0, duration=max(int(1000 * seconds / len(frames)), 40))
  return path


def strip(frames: np.ndarray) -> np.ndarray:
  """uint8 frames [N, H, W, 3] side by side -> [H, N·W, 3]."""
  return np.concatenate(list(frames), axis=1)


# ---- stage progress --------------------------------------------------------------------------------------------------
_REPORT: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("unclip_demo_report",
                                                                                      default=None)
_STAGES = {"encode_image": "CLIP image encoder", "invert": "DDIM inversion", "sample_prior": "prior",
           "decode": "decoder", "upsample": "super-res"}


def _reported(name: str):
  label = _STAGES[name]

  def method(self, *args, **kwargs):
    report = _REPORT.get()
    if report is not None:
      report(label)
    out = getattr(UnCLIP, name)(self, *args, **kwargs)
    if report is not None:
      import jax

      jax.block_until_ready(out)                                  # the page shows the stage that is running
    return out
  method.__name__ = name
  return method


class StagedUnCLIP(UnCLIP):
  """UnCLIP that reports each stage it runs to the current request's progress (same calls, same results)."""


for _name in _STAGES:
  setattr(StagedUnCLIP, _name, _reported(_name))


def staged(pipe: UnCLIP) -> StagedUnCLIP:
  """`pipe` as a StagedUnCLIP (a shallow copy sharing its weights and compiled programs)."""
  if isinstance(pipe, StagedUnCLIP):
    return pipe
  clone = copy.copy(pipe)
  clone.__class__ = StagedUnCLIP
  clone._variants = {}
  return clone


@contextlib.contextmanager
def reporting(callback: Callable[[str], None] | None):
  token = _REPORT.set(callback)
  try:
    yield
  finally:
    _REPORT.reset(token)


# ---- the computations behind each tab --------------------------------------------------------------------------------
class Demo:
  """The tabs' computations over one pipeline, checked inputs in, uint8 images out."""

  def __init__(self, pipe: UnCLIP, *, batch_size: int = 8, tmp_dir: str | pathlib.Path | None = None):
    self.pipe = staged(pipe)
    self.batch_size = batch_size
    self.tmp_dir = pathlib.Path(tmp_dir or tempfile.mkdtemp(prefix="unclip_demo_"))
    self.tmp_dir.mkdir(parents=True, exist_ok=True)
    self.defaults = self.pipe.settings()

  def default_form(self) -> dict[str, Any]:
    s = self.defaults
    form = {"prior_steps": s["prior"]["steps"], "prior_guidance": s["prior"]["guidance_scale"],
            "decoder_steps": s["decoder"]["steps"], "decoder_guidance": s["decoder"]["guidance_scale"],
            "sr_steps": s["super_res"]["steps"] if "super_res" in s else None}
    return form

  def pipeline_for(self, prior_steps, prior_guidance, decoder_steps, decoder_guidance, sr_steps=None) -> UnCLIP:
    form = {"prior": {"steps": check_steps(prior_steps, "Prior steps"),
                      "guidance_scale": check_float(prior_guidance, "Prior guidance", 0.0, MAX_GUIDANCE)},
            "decoder": {"steps": check_steps(decoder_steps, "Decoder steps"),
                        "guidance_scale": check_float(decoder_guidance, "Decoder guidance", 0.0, MAX_GUIDANCE)}}
    if "super_res" in self.defaults:
      form["super_res"] = {"steps": check_steps(sr_steps, "Super-res steps")}
    overrides = stage_overrides(self.defaults, form)
    if not overrides:
      return self.pipe
    try:
      return self.pipe.with_sampling(**overrides)
    except (KeyError, ValueError) as e:
      raise DemoInputError(f"Cannot use these sampler settings: {e}") from None

  def text_to_images(self, prompt, n=4, seed=0, candidates=1, prior_steps=None, prior_guidance=None,
                     decoder_steps=None, decoder_guidance=None, sr_steps=None):
    """-> (images uint8 [n, H, W, 3], clip scores): `UnCLIP.generate` exactly as the sample CLI calls it."""
    prompt = check_prompt(prompt)
    n = check_int(n, "Number of images", 1, MAX_IMAGES)
    seed = check_int(seed, "Seed", 0, MAX_SEED)
    candidates = check_int(candidates, "Candidates", 1, MAX_CANDIDATES)
    d = self.default_form()
    pipe = self.pipeline_for(d["prior_steps"] if prior_steps is None else prior_steps,
                             d["prior_guidance"] if prior_guidance is None else prior_guidance,
                             d["decoder_steps"] if decoder_steps is None else decoder_steps,
                             d["decoder_guidance"] if decoder_guidance is None else decoder_guidance,
                             d["sr_steps"] if sr_steps is None else sr_steps)
    if candidates > 1 and not pipe.has_image_encoder:
      raise DemoInputError("Reranking candidates needs CLIP's image tower, which this bundle lacks: use 1.")
    result = pipe.generate([prompt], seed=seed, images_per_prompt=n, batch_size=self.batch_size,
                           candidates=candidates)
    return result.images, result.clip_scores

  def _needs_image_tower(self):
    if not self.pipe.has_image_encoder:
      raise DemoInputError("This bundle's CLIP has no image tower, which the image manipulations need.")

  def variations(self, image, n=4, eta=1.0, seed=0):
    from unclip_jax.inference import manipulations as M

    self._needs_image_tower()
    image = read_image(image, "an image")
    n = check_int(n, "Number of variations", 1, MAX_IMAGES)
    eta = check_float(eta, "DDIM eta", 0.0, 1.0)
    seed = check_int(seed, "Seed", 0, MAX_SEED)
    return M.variations(self.pipe, image, n, eta=eta, seed=seed)

  def interpolate(self, image_a, image_b, n=5, seed=0):
    """-> (frames uint8 [n, H, W, 3], path of the animated GIF)."""
    from unclip_jax.inference import manipulations as M

    self._needs_image_tower()
    a, b = read_image(image_a, "image A"), read_image(image_b, "image B")
    n = check_int(n, "Number of frames", 2, MAX_FRAMES)
    seed = check_int(seed, "Seed", 0, MAX_SEED)
    frames = M.interpolate(self.pipe, a, b, n, seed=seed)
    fd, path = tempfile.mkstemp(suffix=".gif", prefix="interp_", dir=self.tmp_dir)
    os.close(fd)
    gif = write_gif(frames, pathlib.Path(path))
    return frames, gif

  def text_diff(self, image, caption, target, n=5, max_theta=0.5, seed=0):
    from unclip_jax.inference import manipulations as M

    self._needs_image_tower()
    image = read_image(image, "an image")
    caption, target = check_prompt(caption, "caption"), check_prompt(target, "target caption")
    if caption == target:
      raise DemoInputError("The caption and the target are the same: change the target to say what should change.")
    n = check_int(n, "Number of frames", 1, MAX_FRAMES)
    max_theta = check_float(max_theta, "Max theta", 0.0, 1.0)
    seed = check_int(seed, "Seed", 0, MAX_SEED)
    try:
      return M.text_diff(self.pipe, image, caption, target, n, max_theta=max_theta, seed=seed)
    except ValueError as e:
      raise DemoInputError(str(e)) from None

  def inpaint(self, editor, mask_upload, prompt, n=1, seed=0):
    from unclip_jax.inference import manipulations as M

    image, known = editor_mask(editor, mask_upload)
    prompt = check_prompt(prompt)
    n = check_int(n, "Number of images", 1, MAX_IMAGES)
    seed = check_int(seed, "Seed", 0, MAX_SEED)
    return M.inpaint(self.pipe, image, known, prompt, n, seed=seed)

  def warm_up(self) -> dict[str, Any]:
    """Runs every tab once at its defaults (compiling, or loading from the cache, every program a default click
    needs) -> {"seconds", "image_a", "image_b"} (two generated images that pre-fill the image tabs)."""
    start = time.perf_counter()
    a = self.text_to_images(DEFAULT_PROMPT, 4, 0)[0]
    b = self.text_to_images(SECOND_PROMPT, 4, 0)[0]
    out = {"image_a": a[0], "image_b": b[0]}
    if self.pipe.has_image_encoder:
      self.variations(a[0])
      self.interpolate(a[0], b[0])
      self.text_diff(a[0], DEFAULT_PROMPT, "a blue circle on a white background")
    s = a.shape[1]
    painted = np.zeros((s, s, 4), np.uint8)
    painted[s // 4:3 * s // 4, s // 4:3 * s // 4] = 255
    self.inpaint({"background": a[0], "layers": [painted]}, None, SECOND_PROMPT)
    out["seconds"] = time.perf_counter() - start
    return out


# ---- the page --------------------------------------------------------------------------------------------------------
CSS = """
#title {text-align: center}
.gallery-item img, .unclip-pixels img {image-rendering: pixelated}
.unclip-pixels img {min-width: 160px; min-height: 160px; object-fit: contain}
#int_strip img {height: 160px; width: auto; max-width: 100%; object-fit: contain; image-rendering: pixelated}
"""


def build_app(pipe: UnCLIP, *, demo: Demo | None = None, examples: dict[str, Any] | None = None,
              title: str = "unCLIP (JAX)"):
  """The Gradio Blocks page over `pipe`; examples: {"image_a", "image_b"} pre-fill the image tabs."""
  import gradio as gr

  demo = demo or Demo(pipe)
  examples = examples or {}
  d = demo.default_form()
  ex_a, ex_b = examples.get("image_a"), examples.get("image_b")

  def guarded(fn, stages: Callable[..., int]):
    """fn's DemoInputErrors -> gr.Error (shown in the page), per-stage progress, timing in the log."""
    def handler(*args, progress=gr.Progress()):
      total = max(int(stages(*args)), 1)
      seen = [0]

      def report(label):
        seen[0] += 1
        progress(min(seen[0] - 1, total - 1) / total, desc=f"{label} ({min(seen[0], total)}/{total})")
      start = time.perf_counter()
      progress(0.0, desc="starting")
      try:
        with reporting(report):
          out = fn(*args)
      except DemoInputError as e:
        raise gr.Error(str(e)) from None
      log.info("%s took %.2f s", fn.__name__, time.perf_counter() - start)
      return out
    handler.__name__ = fn.__name__
    return handler

  def _int(v, default=1):
    try:
      return max(int(float(v)), 1)
    except (TypeError, ValueError):
      return default

  # -- tab functions (page values in, component values out) --
  def generate(prompt, n, seed, candidates, prior_steps, prior_guidance, decoder_steps, decoder_guidance, sr_steps):
    images, scores = demo.text_to_images(prompt, n, seed, candidates, prior_steps, prior_guidance, decoder_steps,
                                         decoder_guidance, sr_steps)
    items = [(im, f"#{k}" + (f"  CLIP {s:.1f}" if s is not None else ""))
             for k, (im, s) in enumerate(zip(images, scores))]
    status = f"{len(images)} image(s) of {images.shape[1]}×{images.shape[2]}, seed {int(float(seed))}."
    return items, list(images), 0, status, prompt.strip()
  generate.__name__ = "text_to_images"

  def generate_stages(prompt, n, seed, candidates, *rest):
    rows = _int(n) * _int(candidates)
    return 3 * -(-rows // demo.batch_size) + (1 if _int(candidates) > 1 else 0)

  def variations(image, n, eta, seed):
    return list(demo.variations(image, n, eta, seed))

  def interpolate(a, b, n, seed):
    frames, gif = demo.interpolate(a, b, n, seed)
    return strip(frames), str(gif)

  def text_diff(image, caption, target, n, max_theta, seed):
    return list(demo.text_diff(image, caption, target, n, max_theta, seed))

  def inpaint(editor, mask_upload, prompt, n, seed):
    return list(demo.inpaint(editor, mask_upload, prompt, n, seed))

  def image_input(label, value=None, elem_id=None, what=None):
    img = gr.Image(label=label, value=value, type="filepath", image_mode=None, format="png",
                   sources=["upload", "clipboard"], elem_id=elem_id, height=256,
                   elem_classes=["unclip-pixels"])
    preprocess = img.preprocess

    def checked(payload):
      try:
        return preprocess(payload)
      except gr.Error:
        raise
      except Exception:
        raise gr.Error(f"The file given as {what or label.lower()} is not an image this demo can read; upload a "
                       f"PNG or JPEG.") from None
    img.preprocess = checked
    return img

  with gr.Blocks(title=title) as app:
    gr.Markdown(f"# {title}\nunCLIP (DALL·E 2) in JAX/Flax, {pipe_name(demo.pipe)}: "
                f"{demo.pipe.image_size}×{demo.pipe.image_size} images. Requests run one at a time (queued).",
                elem_id="title")
    images_state = gr.State([])
    prompt_state = gr.State(DEFAULT_PROMPT)
    selected = gr.State(0)
    with gr.Tabs() as tabs:
      with gr.Tab("Text → images", id="t2i"):
        with gr.Row():
          with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, elem_id="t2i_prompt", lines=1, max_lines=3)
            with gr.Row():
              n_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="t2i_n")
              seed = gr.Number(0, label="Seed", precision=0, elem_id="t2i_seed")
              candidates = gr.Slider(1, MAX_CANDIDATES, value=1, step=1, label="Candidates (CLIP reranking)",
                                     elem_id="t2i_candidates")
            with gr.Accordion("Sampler settings per stage", open=False):
              with gr.Row():
                prior_steps = gr.Textbox(str(d["prior_steps"]), label="Prior steps", elem_id="prior_steps")
                prior_guidance = gr.Number(d["prior_guidance"], label="Prior guidance", elem_id="prior_guidance")
                decoder_steps = gr.Textbox(str(d["decoder_steps"]), label="Decoder steps", elem_id="decoder_steps")
                decoder_guidance = gr.Number(d["decoder_guidance"], label="Decoder guidance",
                                             elem_id="decoder_guidance")
                sr_steps = gr.Textbox(str(d["sr_steps"]), label="Super-res steps", elem_id="sr_steps",
                                      visible=d["sr_steps"] is not None)
            go = gr.Button("Generate", variant="primary", elem_id="t2i_go")
            status = gr.Markdown("", elem_id="t2i_status")
          with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", format="png", columns=4, height=340, object_fit="contain",
                                 elem_id="t2i_gallery", interactive=False)
            gr.Markdown("Select an image, then send it to another tab:")
            with gr.Row():
              to_var = gr.Button("→ Variations", size="sm", min_width=80)
              to_a = gr.Button("→ Interpolation A", size="sm", min_width=80)
              to_b = gr.Button("→ Interpolation B", size="sm", min_width=80)
              to_diff = gr.Button("→ Text diff", size="sm", min_width=80)
              to_inp = gr.Button("→ Inpainting", size="sm", min_width=80)
      with gr.Tab("Variations", id="variations"):
        with gr.Row():
          with gr.Column():
            var_image = image_input("Image", ex_a, elem_id="var_image")
            with gr.Row():
              var_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of variations")
              var_eta = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="DDIM η (0 reconstructs)")
              var_seed = gr.Number(0, label="Seed", precision=0)
            var_go = gr.Button("Make variations", variant="primary", elem_id="var_go")
          var_gallery = gr.Gallery(label="Variations", format="png", columns=4, height="auto", object_fit="contain",
                                   elem_id="var_gallery", interactive=False)
      with gr.Tab("Interpolation", id="interpolation"):
        with gr.Row():
          int_a = image_input("Image A", ex_a, elem_id="int_a")
          int_b = image_input("Image B", ex_b, elem_id="int_b")
          with gr.Column():
            int_n = gr.Slider(2, MAX_FRAMES, value=5, step=1, label="Frames")
            int_seed = gr.Number(0, label="Seed", precision=0)
            int_go = gr.Button("Interpolate", variant="primary", elem_id="int_go")
        int_strip = gr.Image(label="Frames A → B", format="png", interactive=False, elem_id="int_strip")
        int_gif = gr.Image(label="Animated", type="filepath", interactive=False, elem_id="int_gif", height=256)
      with gr.Tab("Text diff", id="text_diff"):
        with gr.Row():
          with gr.Column():
            diff_image = image_input("Image", ex_a, elem_id="diff_image")
            diff_caption = gr.Textbox(DEFAULT_PROMPT, label="Caption (what the image shows)")
            diff_target = gr.Textbox("a blue circle on a white background", label="Target (what it should show)")
            with gr.Row():
              diff_n = gr.Slider(1, MAX_FRAMES, value=5, step=1, label="Frames")
              diff_theta = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Max θ")
              diff_seed = gr.Number(0, label="Seed", precision=0)
            diff_go = gr.Button("Apply text diff", variant="primary", elem_id="diff_go")
          diff_gallery = gr.Gallery(label="θ from 0 to max", format="png", columns=5, height="auto",
                                    object_fit="contain", elem_id="diff_gallery", interactive=False)
      with gr.Tab("Inpainting", id="inpainting"):
        with gr.Row():
          with gr.Column():
            inp_editor = gr.ImageEditor(
                label="Image: paint over the region to fill", value=ex_a, type="numpy", image_mode="RGBA",
                sources=["upload", "clipboard"], transforms=(), format="png", height=320, elem_id="inp_editor",
                brush=gr.Brush(default_size=max(demo.pipe.image_size // 8, 2), colors=["#ff00ff"],
                               color_mode="fixed"),
                layers=False)
            inp_mask = image_input("Or a mask of the same size (white = keep, black = fill)", None,
                                   elem_id="inp_mask", what="the mask")
            inp_prompt = gr.Textbox(SECOND_PROMPT, label="Prompt for the filled region")
            with gr.Row():
              inp_n = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
              inp_seed = gr.Number(0, label="Seed", precision=0)
            inp_go = gr.Button("Inpaint", variant="primary", elem_id="inp_go")
          inp_gallery = gr.Gallery(label="Inpainted", format="png", columns=2, height="auto", object_fit="contain",
                                   elem_id="inp_gallery", interactive=False)

    t2i_inputs = [prompt, n_images, seed, candidates, prior_steps, prior_guidance, decoder_steps, decoder_guidance,
                  sr_steps]
    t2i_outputs = [gallery, images_state, selected, status, prompt_state]
    go.click(guarded(generate, generate_stages), t2i_inputs, t2i_outputs)
    prompt.submit(guarded(generate, generate_stages), t2i_inputs, t2i_outputs)
    var_go.click(guarded(variations, lambda *a: 4), [var_image, var_n, var_eta, var_seed], var_gallery)
    int_go.click(guarded(interpolate, lambda *a: 6), [int_a, int_b, int_n, int_seed], [int_strip, int_gif])
    diff_go.click(guarded(text_diff, lambda *a: 4), [diff_image, diff_caption, diff_target, diff_n, diff_theta,
                                                     diff_seed], diff_gallery)
    inp_go.click(guarded(inpaint, lambda *a: 3), [inp_editor, inp_mask, inp_prompt, inp_n, inp_seed], inp_gallery)

    def on_select(evt):
      return evt.index
    on_select.__annotations__ = {"evt": gr.SelectData}         # resolved here: gr is not a module global

    gallery.select(on_select, None, selected, concurrency_limit=None)

    def pick(images, index, tab):
      if not images:
        raise gr.Error("Generate images first, then select one to send.")
      return images[min(int(index or 0), len(images) - 1)], gr.Tabs(selected=tab)

    light = dict(concurrency_limit=None)                           # no model: not queued behind a generation
    to_var.click(lambda i, k: pick(i, k, "variations"), [images_state, selected], [var_image, tabs], **light)
    to_a.click(lambda i, k: pick(i, k, "interpolation"), [images_state, selected], [int_a, tabs], **light)
    to_b.click(lambda i, k: pick(i, k, "interpolation"), [images_state, selected], [int_b, tabs], **light)
    to_diff.click(lambda i, k, p: pick(i, k, "text_diff") + (p,), [images_state, selected, prompt_state],
                  [diff_image, tabs, diff_caption], **light)
    to_inp.click(lambda i, k: pick(i, k, "inpainting"), [images_state, selected], [inp_editor, tabs], **light)
  app.queue(default_concurrency_limit=1, max_size=32)
  return app



def pipe_name(pipe: UnCLIP) -> str:
  return getattr(pipe, "bundle_name", "a model bundle")


def theme():
  """The default theme with system fonts (the page loads nothing from the internet)."""
  import gradio as gr

  fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
  return gr.themes.Default(font=fonts, font_mono=["ui-monospace", "monospace"])


# ---- command line ----------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m unclip_jax.demo", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--bundle", default=None, help="model bundle folder (default: the embedded model)")
  p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="persistent XLA compilation cache (default: $UNCLIP_JAX_CACHE, else ~/.cache/unclip_jax/xla; "
                      "'' disables)")
  p.add_argument("--no-warmup", action="store_true", help="start serving at once (the first clicks compile)")
  return p


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("httpx", "jax", "absl"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Uploads, outputs and gradio's cache go to a fresh temporary folder unless the user chose one.
  tmp = os.environ.get("GRADIO_TEMP_DIR")
  if not tmp:                                                     # ours: removed when the server stops
    tmp = tempfile.mkdtemp(prefix="unclip_demo_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  os.environ["GRADIO_TEMP_DIR"] = tmp
  pathlib.Path(tmp).mkdir(parents=True, exist_ok=True)
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio  # noqa: F401
  except ImportError:
    print("error: the demo needs gradio: pip install 'unclip_jax[demo]'", file=sys.stderr)
    return 2
  from unclip_jax import compilation_cache
  from unclip_jax.sample import DEFAULT_BUNDLE, resolve_dtype

  bundle_path = pathlib.Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
  if not bundle_path.is_dir():
    print(f"error: model bundle not found: {bundle_path}", file=sys.stderr)
    return 2
  compilation_cache.enable(compilation_cache.resolve(args.compilation_cache, compilation_cache.default_dir()))
  start = time.perf_counter()
  pipe = StagedUnCLIP.from_bundle(bundle_path, dtype=resolve_dtype(args.dtype), progress=False)
  pipe.bundle_name = "the embedded shapes model" if args.bundle is None else f"bundle {bundle_path.name}"
  log.info("loaded %s in %.1f s", bundle_path, time.perf_counter() - start)
  demo = Demo(pipe, tmp_dir=tmp)
  examples = {}
  if not args.no_warmup:
    examples = demo.warm_up()
    log.info("warm-up (every tab once) took %.1f s", examples["seconds"])
  app = build_app(pipe, demo=demo, examples=examples)
  print(f"unclip_jax demo: http://{args.host}:{args.port} (temporary files in {tmp})", flush=True)
  signal.signal(signal.SIGTERM, _interrupt)                    # a clean stop (and clean-up) on SIGTERM too
  app.launch(server_name=args.host, server_port=args.port, show_error=True, theme=theme(), css=CSS,
             footer_links=[], allowed_paths=[tmp])
  return 0


if __name__ == "__main__":
  sys.exit(main())
