"""Evaluation of an unCLIP trained on the captioned-shapes data: prompt adherence and CLIP scores.

  python -m unclip_jax.shapes.evaluate --bundle B --data DATASET_DIR [--classifier PATH] [--n-prompts 96]
      [--seed 0 | --seeds 0,1,2] [--batch-size 24] [--holdout "red triangle,green circle"] [--out report.json]

1. An attribute classifier (small linen CNN, three softmax heads: colour 8, shape 3, background 8) is trained with
   optax on real images of a shapes dataset (`python -m unclip_jax.shapes.data`); the last fifth (at most
   `n_val`) of the dataset is its validation split, and its per-head validation accuracy is reported. It is also
   checked on freshly drawn images of the held-out colour×shape pairs, which a dataset with a holdout never shows
   it. `--classifier PATH` keeps it as PATH/classifier.json + PATH/params.safetensors (trained there if missing).
2. Prompts cover every colour×shape pair with several backgrounds (the dataset's caption templates); one image per
   prompt is generated (seeded), classified, and scored: accuracy of colour, shape, background and all three,
   overall and for the held-out vs the seen pairs.
3. CLIP score = 100·cos(CLIP image embedding, CLIP text embedding of its prompt) with the bundle's own CLIP, for the
   generated images and, as references, for real images with their own and with other images' captions.
Images of any square size are resized (antialiased bilinear) to the classifier's input size. Nothing is pickled.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from unclip_jax.shapes import data as shapes

HEADS = {"colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES), "background": len(shapes.COLOURS)}
HEAD_NAMES = {"colour": shapes.COLOUR_NAMES, "shape": shapes.SHAPES, "background": shapes.COLOUR_NAMES}
GROUPS = ("all", "seen", "heldout")
FORMAT = "unclip_jax.shapes_classifier"
SCHEMA = 1
CONFIG_NAME = "classifier.json"
PARAMS_NAME = "params.safetensors"
PROMPT_ORDER_SEED = 0        # the prompt list depends on n only, never on --seed
HELDOUT_CHECK_SEED = 7919    # freshly drawn held-out-pair images for the classifier check


# ---- the classifier ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Hyper-parameters of the attribute classifier (shape tower: a stride-1 and a stride-2 3x3 conv per width)."""
  input_size: int = 32
  widths: tuple[int, ...] = (16, 32, 32)
  hidden: int = 64

  def to_dict(self) -> dict[str, Any]:
    return {"input_size": self.input_size, "widths": list(self.widths), "hidden": self.hidden}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ClassifierConfig":
    return cls(input_size=int(d["input_size"]), widths=tuple(int(w) for w in d["widths"]), hidden=int(d["hidden"]))


def _module(cfg: ClassifierConfig):
  import flax.linen as nn
  import jax.numpy as jnp

  class Tower(nn.Module):
    """[B, S, S, C] -> pooled features [B, 2·widths[-1]] (a stride-1 and a stride-2 3x3 conv per width)."""
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
      for i, w in enumerate(self.widths):
        x = nn.relu(nn.Conv(w, (3, 3), name=f"conv{i}_a")(x))
        x = nn.relu(nn.Conv(w, (3, 3), strides=(2, 2), name=f"conv{i}_b")(x))
      return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)

  class AttributeClassifier(nn.Module):
    """[B, S, S, 3] floats in [-1, 1] -> logits {"colour": [B, 8], "shape": [B, 3], "background": [B, 8]}.

    The background colour is estimated as the per-channel median of the border pixels and the foreground map is
    the distance of every pixel from it, scaled by its 98th percentile (≈ 1 inside the shape, 0 on the
    background). The shape head sees only this colour-blind map (a conv tower), so it cannot learn colour×shape
    correlations of the training data (which lacks the held-out pairs); colour and background heads see
    the map-weighted mean colour and the background estimate (an MLP, no spatial features, so no shape cue)."""
    widths: tuple[int, ...]
    hidden: int

    @nn.compact
    def __call__(self, x):
      b = x.shape[0]
      border = jnp.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)    # [B, 4S-4, 3]
      bg = jnp.median(border, axis=1)                                                      # [B, 3]
      dist = jnp.sqrt(jnp.sum(jnp.square(x - bg[:, None, None]), axis=-1, keepdims=True) + 1e-8)   # [B, S, S, 1]
      scale = jnp.quantile(dist.reshape(b, -1), 0.98, axis=1)
      fg = jnp.clip(dist / (scale[:, None, None, None] + 0.05), 0.0, 1.5)
      w = jnp.clip(fg, 0.0, 1.0) ** 2
      fg_colour = jnp.sum(w * x, axis=(1, 2)) / (jnp.sum(w, axis=(1, 2)) + 1e-3)             # [B, 3]
      shape_h = nn.relu(nn.Dense(self.hidden, name="shape_hidden")(Tower(self.widths, name="shape_tower")(fg)))
      colour_h = nn.relu(nn.Dense(self.hidden, name="colour_hidden_0")(jnp.concatenate([fg_colour, bg], -1)))
      colour_h = nn.relu(nn.Dense(self.hidden, name="colour_hidden_1")(colour_h))
      return {"colour": nn.Dense(HEADS["colour"], name="colour")(colour_h),
              "shape": nn.Dense(HEADS["shape"], name="shape")(shape_h),
              "background": nn.Dense(HEADS["background"], name="background")(colour_h)}

  return AttributeClassifier(widths=tuple(cfg.widths), hidden=int(cfg.hidden))


@dataclasses.dataclass
class Classifier:
  """A trained attribute classifier: config, float32 params and how it was trained / validated."""
  config: ClassifierConfig
  params: Any
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    import jax

    model = _module(self.config)
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def logits(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """uint8 images [N, H, W, 3] (any square size) -> logits per head [N, classes] (fixed-size padded batches)."""
    x = resize_images(images, self.config.input_size)
    out = {k: [] for k in HEADS}
    for start in range(0, len(x), batch_size):
      chunk = x[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
      res = self._apply(self.params, chunk)
      for k in HEADS:
        out[k].append(np.asarray(res[k])[:n])
    return {k: (np.concatenate(v) if v else np.zeros((0, HEADS[k]), np.float32)) for k, v in out.items()}

  def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """uint8 images [N, H, W, 3] -> predicted ids per head, int32 [N]."""
    return {k: v.argmax(-1).astype(np.int32) for k, v in self.logits(images, batch_size).items()}


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] square images -> float32 [N, size, size, 3] in [-1, 1] (PIL bilinear, antialiased)."""
  from PIL import Image

  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be square, got {images.shape[1]}x{images.shape[2]}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  if images.shape[1] != size:
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample=Image.Resampling.BILINEAR))
                       for im in images]) if len(images) else np.zeros((0, size, size, 3), np.uint8)
  return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def accuracy_per_head(pred: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]) -> dict[str, float | None]:
  """{colour, shape, background, all_three: fraction correct} (None for no examples)."""
  n = len(target["colour"])
  if n == 0:
    return {**{k: None for k in HEADS}, "all_three": None}
  ok = {k: np.asarray(pred[k]) == np.asarray(target[k]) for k in HEADS}
  out = {k: float(v.mean()) for k, v in ok.items()}
  out["all_three"] = float(np.logical_and.reduce([ok[k] for k in HEADS]).mean())
  return out


# ---- real data --------------------------------------------------------------------------------------------------
def dataset_metadata(data_dir) -> dict[str, Any]:
  """The shapes dataset's metadata ({"holdout": [[colour, shape], ...], "size", ...}); {} if it has none."""
  import tensorflow_datasets as tfds

  from unclip_jax.data import pipeline

  builder = tfds.builder_from_directory(os.fspath(pipeline.resolve_dataset_dir(data_dir)))
  return dict(builder.info.metadata or {})


def load_real(data_dir, indices: Sequence[int]) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
  """Examples `indices` of a shapes dataset -> (uint8 images [N, H, W, 3], labels {head: int32 [N]}, captions)."""
  from unclip_jax.data import pipeline

  source, features = pipeline.open_source(data_dir)
  missing = [k for k in (*HEADS, "image", "caption") if k not in features]
  if missing:
    raise ValueError(f"{data_dir} is not a shapes dataset: it lacks feature(s) {missing} "
                     f"(write one with `python -m unclip_jax.shapes.data`)")
  images, labels, captions = [], {k: [] for k in HEADS}, []
  for i in indices:
    ex = source[int(i)]
    images.append(np.asarray(ex["image"], np.uint8))
    for k in HEADS:
      labels[k].append(int(ex[k]))
    c = ex["caption"]
    captions.append(c.decode("utf-8") if isinstance(c, bytes) else str(c))
  if images and len({im.shape for im in images}) != 1:
    raise ValueError(f"{data_dir}: images differ in size")
  return np.stack(images), {k: np.asarray(v, np.int32) for k, v in labels.items()}, captions


def dataset_size(data_dir) -> int:
  from unclip_jax.data import pipeline

  return len(pipeline.open_source(data_dir)[0])


def split_indices(n: int, n_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
  """Validation = the last min(n_val, n // 5) examples; train = the first min(n_train, rest)."""
  if n < 10:
    raise ValueError(f"the dataset has {n} examples; the classifier needs at least 10")
  nv = max(1, min(n_val, n // 5))
  return np.arange(min(n_train, n - nv)), np.arange(n - nv, n)


def draw_pairs(pairs: Sequence[tuple[str, str]], per_pair: int, image_size: int, seed: int = HELDOUT_CHECK_SEED):
  """Freshly drawn real images of the given colour×shape pairs (random background != colour) -> (uint8, labels)."""
  images, labels = [], {k: [] for k in HEADS}
  for j, (colour, shape) in enumerate(pairs):
    c, s = shapes.COLOUR_NAMES.index(colour), shapes.SHAPES.index(shape)
    for i in range(per_pair):
      rng = np.random.default_rng([seed, j, i])
      b = int(rng.integers(len(shapes.COLOURS) - 1))
      b += b >= c
      image, _ = shapes.draw(c, s, b, image_size, rng)
      images.append(np.asarray(image, np.uint8))
      for k, v in zip(HEADS, (c, s, b)):
        labels[k].append(v)
  return np.stack(images), {k: np.asarray(v, np.int32) for k, v in labels.items()}


# ---- training ---------------------------------------------------------------------------------------------------
def train_classifier(data_dir, *, config: ClassifierConfig | None = None, seed: int = 0, steps: int = 400,
                     batch_size: int = 64, lr: float = 3e-3, n_train: int = 6000, n_val: int = 1000,
                     noise_std: float = 0.06, log=None) -> Classifier:
  """Trains the attribute classifier on real images of a shapes dataset; deterministic given `seed`.

  `fit_classifier` on the first `n_train` examples; `info` gets the per-head validation accuracy on the held-out
  validation split (the dataset's last examples), sizes, settings and training seconds.
  """
  for name, v in (("n_train", n_train), ("n_val", n_val)):
    if int(v) < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  t0 = time.perf_counter()
  train_idx, val_idx = split_indices(dataset_size(data_dir), n_train, n_val)
  train_images, train_labels, _ = load_real(data_dir, train_idx)
  val_images, val_labels, _ = load_real(data_dir, val_idx)
  t_data = time.perf_counter() - t0
  clf = fit_classifier(train_images, train_labels, config=config, seed=seed, steps=steps, batch_size=batch_size,
                       lr=lr, noise_std=noise_std, log=log)
  val = accuracy_per_head(clf.predict(val_images), val_labels)
  clf.info.update(val_accuracy=val, n_val=int(len(val_idx)), n_train=int(len(train_idx)), data=os.fspath(data_dir),
                  data_seconds=round(t_data, 2), val_image_size=int(val_images.shape[1]))
  return clf


def fit_classifier(images: np.ndarray, labels: Mapping[str, np.ndarray], *, config: ClassifierConfig | None = None,
                   seed: int = 0, steps: int = 400, batch_size: int = 64, lr: float = 3e-3, noise_std: float = 0.06,
                   log=None) -> Classifier:
  """Trains the attribute classifier on uint8 images [N, H, W, 3] with labels {head: int [N]}.

  Adam (warmup + cosine decay) on the summed cross-entropy of the three heads; augmentation: horizontal flips and
  Gaussian pixel noise of std U(0, noise_std) in [-1, 1] units. Deterministic given `seed`; `info` holds the
  settings, final loss and training seconds.
  """
  import jax
  import jax.numpy as jnp
  import optax

  for name, v in (("steps", steps), ("batch_size", batch_size)):
    if int(v) < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  if lr <= 0:
    raise ValueError(f"lr must be positive, got {lr}")
  if len(images) < 1 or any(len(labels[k]) != len(images) for k in HEADS):
    raise ValueError(f"need images and one label per image for each of {list(HEADS)}")
  config = config or ClassifierConfig()
  t0 = time.perf_counter()
  x_train = resize_images(images, config.input_size)
  y_train = np.stack([np.asarray(labels[k]) for k in HEADS], axis=1)                  # [N, 3]

  model = _module(config)
  key = jax.random.key(seed)
  params = model.init(jax.random.fold_in(key, 0), jnp.zeros((1, config.input_size, config.input_size, 3)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=steps,
                                                end_value=lr * 0.02)
  tx = optax.scale_by_adam()          # the step size and the noise level are inputs, so every run shares one program
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], y[:, i]).mean()
               for i, k in enumerate(HEADS))

  @jax.jit
  def step(p, s, x, y, rng, step_size, max_std):
    flip_rng, std_rng, noise_rng = jax.random.split(rng, 3)
    flip = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    std = jax.random.uniform(std_rng, (x.shape[0], 1, 1, 1)) * max_std
    x = x + std * jax.random.normal(noise_rng, x.shape)
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return jax.tree.map(lambda w, u: w - step_size * u, p, updates), s, loss

  order = np.random.default_rng(seed)
  bs = min(batch_size, len(x_train))
  loss = float("nan")
  for i in range(steps):
    idx = order.choice(len(x_train), bs, replace=False)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx], jax.random.fold_in(key, i + 1),
                                   np.float32(schedule(i)), np.float32(noise_std))
    if log is not None and (i + 1) % max(1, steps // 5) == 0:
      log(f"classifier step {i + 1}/{steps}: loss {float(loss):.4f}")
  params = jax.tree.map(np.asarray, params)
  info = {"final_loss": float(loss), "seed": seed, "steps": steps, "batch_size": bs, "lr": lr,
          "noise_std": noise_std, "train_seconds": round(time.perf_counter() - t0, 2)}
  return Classifier(config, params, info)


# ---- save / load ------------------------------------------------------------------------------------------------
def save_classifier(clf: Classifier, path) -> pathlib.Path:
  """PATH/classifier.json (config, class names, training info) + PATH/params.safetensors."""
  from safetensors.numpy import save_file

  from unclip_jax import bundle

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in bundle.flatten_params(clf.params).items()}
  save_file(tensors, str(path / PARAMS_NAME), metadata={"format": FORMAT})
  meta = {"format": FORMAT, "schema": SCHEMA, "config": clf.config.to_dict(),
          "classes": {"colour": list(shapes.COLOUR_NAMES), "shape": list(shapes.SHAPES),
                      "background": list(shapes.COLOUR_NAMES)}, "info": clf.info}
  tmp = path / f".{CONFIG_NAME}.tmp"
  tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
  os.replace(tmp, path / CONFIG_NAME)
  return path


def classifier_exists(path) -> bool:
  path = pathlib.Path(path)
  return (path / CONFIG_NAME).is_file() and (path / PARAMS_NAME).is_file()


def load_classifier(path) -> Classifier:
  """Reads what `save_classifier` wrote; checks the format, class names and every parameter shape."""
  import jax
  import jax.numpy as jnp

  from unclip_jax import bundle
  from unclip_jax.convert import torch_layout

  path = pathlib.Path(path)
  if not classifier_exists(path):
    raise FileNotFoundError(f"no classifier at {path} (needs {CONFIG_NAME} and {PARAMS_NAME})")
  try:
    meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"corrupt classifier config {path / CONFIG_NAME}: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path / CONFIG_NAME} is not a shapes classifier (format {FORMAT!r} expected)")
  if not isinstance(meta.get("schema"), int) or meta["schema"] > SCHEMA:
    raise ValueError(f"{path / CONFIG_NAME}: schema {meta.get('schema')!r} is newer than this code ({SCHEMA})")
  classes = meta.get("classes", {})
  if (classes.get("colour") != list(shapes.COLOUR_NAMES) or classes.get("shape") != list(shapes.SHAPES)
      or classes.get("background") != list(shapes.COLOUR_NAMES)):
    raise ValueError(f"{path / CONFIG_NAME}: class names {classes} differ from this dataset's")
  cfg = ClassifierConfig.from_dict(meta["config"])
  flat = {k: np.asarray(v, np.float32) for k, v in torch_layout.read_safetensors(path / PARAMS_NAME).items()}
  abstract = jax.eval_shape(
      lambda: _module(cfg).init(jax.random.key(0), jnp.zeros((1, cfg.input_size, cfg.input_size, 3)))["params"])
  expected = {"/".join(str(k.key) for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  if set(flat) != set(expected):
    extra, missing = sorted(set(flat) - set(expected)), sorted(set(expected) - set(flat))
    raise ValueError(f"{path / PARAMS_NAME}: parameters do not match the config (unexpected {extra[:3]}, "
                     f"missing {missing[:3]})")
  for k, v in flat.items():
    if v.shape != tuple(expected[k].shape):
      raise ValueError(f"{path / PARAMS_NAME}: parameter {k!r} has shape {v.shape}, expected {expected[k].shape}")
  return Classifier(cfg, bundle.unflatten_params(flat), dict(meta.get("info", {})))


# ---- prompts and metrics ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prompt:
  colour: int
  shape: int
  background: int
  template: int
  text: str

  @property
  def pair(self) -> tuple[str, str]:
    return shapes.COLOUR_NAMES[self.colour], shapes.SHAPES[self.shape]


def max_prompts() -> int:
  return len(shapes.COLOURS) * len(shapes.SHAPES) * (len(shapes.COLOURS) - 1)


def make_prompts(n: int) -> list[Prompt]:
  """n prompts in rounds: round r gives every colour×shape pair (colour-major) its r-th background (a fixed
  per-pair permutation of the colours != its colour) and template (r + pair index) mod 3. Depends on n only."""
  if not 1 <= n <= max_prompts():
    raise ValueError(f"n_prompts must be in [1, {max_prompts()}] (pairs x backgrounds), got {n}")
  rng = np.random.default_rng(PROMPT_ORDER_SEED)
  pairs = [(c, s) for c in range(len(shapes.COLOURS)) for s in range(len(shapes.SHAPES))]
  backgrounds = [rng.permutation([b for b in range(len(shapes.COLOURS)) if b != c]) for c, _ in pairs]
  out = []
  for r in range(len(shapes.COLOURS) - 1):
    for j, (c, s) in enumerate(pairs):
      b, t = int(backgrounds[j][r]), (r + j) % len(shapes.TEMPLATES)
      out.append(Prompt(c, s, b, t, shapes.caption(shapes.COLOUR_NAMES[c], shapes.SHAPES[s],
                                                   shapes.COLOUR_NAMES[b], t)))
      if len(out) == n:
        return out
  return out


def heldout_mask(colour: np.ndarray, shape: np.ndarray, holdout: Sequence[tuple[str, str]]) -> np.ndarray:
  """bool [N]: whether (colour id, shape id) is one of the held-out (colour name, shape name) pairs."""
  ids = {(shapes.COLOUR_NAMES.index(c), shapes.SHAPES.index(s)) for c, s in holdout}
  return np.array([(int(c), int(s)) in ids for c, s in zip(colour, shape)], bool)


def adherence(pred: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
              holdout: Sequence[tuple[str, str]]) -> dict[str, Any]:
  """Accuracy of predicted vs prompted attributes, per group.

  Args:
    pred, target: {"colour", "shape", "background": int [N]} (target = what the prompt asked for).
    holdout: held-out (colour, shape) name pairs; groups split on the *prompted* pair.
  Returns:
    {"all" | "seen" | "heldout": {"n", "colour", "shape", "background", "all_three"}, "per_pair": {"red circle":
    {...}}} with accuracies in [0, 1] (None for an empty group).
  """
  target = {k: np.asarray(target[k]) for k in HEADS}
  pred = {k: np.asarray(pred[k]) for k in HEADS}
  if len({len(v) for v in (*target.values(), *pred.values())}) != 1:
    raise ValueError("pred and target must hold the same number of examples per head")
  held = heldout_mask(target["colour"], target["shape"], holdout)
  out: dict[str, Any] = {}
  for group, mask in (("all", np.ones_like(held)), ("seen", ~held), ("heldout", held)):
    out[group] = {"n": int(mask.sum()), **accuracy_per_head({k: v[mask] for k, v in pred.items()},
                                                            {k: v[mask] for k, v in target.items()})}
  per_pair = {}
  for c, s in sorted({(int(c), int(s)) for c, s in zip(target["colour"], target["shape"])}):
    mask = (target["colour"] == c) & (target["shape"] == s)
    per_pair[f"{shapes.COLOUR_NAMES[c]} {shapes.SHAPES[s]}"] = {
        "n": int(mask.sum()), **accuracy_per_head({k: v[mask] for k, v in pred.items()},
                                                  {k: v[mask] for k, v in target.items()})}
  out["per_pair"] = per_pair
  return out


def clip_score(pipe, images: np.ndarray, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
  """100·cos(CLIP image embedding, CLIP text embedding) per (image, text) pair with the pipeline's CLIP -> [N]."""
  import jax.numpy as jnp

  from unclip_jax.stages import clip as clip_stage

  if len(images) != len(texts):
    raise ValueError(f"{len(images)} images but {len(texts)} texts")
  out = []
  for start in range(0, len(texts), batch_size):
    img = np.asarray(pipe.encode_image(list(images[start:start + batch_size])))
    txt = np.asarray(pipe.encode_text(list(texts[start:start + batch_size])).emb)
    out.append(np.asarray(clip_stage.clip_scores(jnp.asarray(txt), jnp.asarray(img)[:, None]))[:, 0])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _mean(x) -> float | None:
  x = np.asarray(x, np.float64)
  return float(x.mean()) if x.size else None


# ---- the evaluation ---------------------------------------------------------------------------------------------
def get_classifier(data_dir, path=None, *, seed: int = 0, log=None, **train_kwargs) -> tuple[Classifier, bool]:
  """Loads the classifier at `path`, or trains it on `data_dir` (and saves it at `path` if given).
  Returns (classifier, whether it was trained now)."""
  if path is not None and classifier_exists(path):
    return load_classifier(path), False
  clf = train_classifier(data_dir, seed=seed, log=log, **train_kwargs)
  if path is not None:
    save_classifier(clf, path)
  return clf, True


def evaluate(pipe, data_dir, classifier: Classifier, *, n_prompts: int = 96, seed: int = 0, batch_size: int = 24,
             holdout: Sequence[tuple[str, str]] | None = None, n_real: int | None = None,
             heldout_check_per_pair: int = 50) -> dict[str, Any]:
  """Generates one image per prompt with `pipe` (an `UnCLIP`), classifies and CLIP-scores them.

  holdout None reads the held-out pairs from the dataset metadata. n_real (default n_prompts) real images of the
  dataset's last examples are the CLIP-score reference. Returns the JSON-able report.
  """
  t_start = time.perf_counter()
  meta = dataset_metadata(data_dir)
  if holdout is None:
    holdout = shapes.parse_holdout([" ".join(p) for p in meta.get("holdout", [])])
  holdout = [tuple(p) for p in holdout]
  prompts = make_prompts(n_prompts)
  target = {k: np.array([getattr(p, k) for p in prompts], np.int32) for k in HEADS}
  timing: dict[str, float] = {}

  t0 = time.perf_counter()
  gen = pipe.generate([p.text for p in prompts], seed=seed, batch_size=batch_size)
  images = gen.images
  timing["generate_seconds"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  pred = classifier.predict(images)
  timing["classify_seconds"] = time.perf_counter() - t0
  report: dict[str, Any] = {"n_prompts": len(prompts), "seed": seed, "batch_size": batch_size,
                            "image_size": int(images.shape[1]), "holdout": [list(p) for p in holdout],
                            "adherence": adherence(pred, target, holdout)}

  cls_info = dict(classifier.info)
  check = None
  if holdout:
    size = int(meta.get("size") or images.shape[1])
    h_images, h_labels = draw_pairs(holdout, heldout_check_per_pair, size)
    check = dict(n=int(len(h_images)), **accuracy_per_head(classifier.predict(h_images), h_labels))
  report["classifier"] = {"config": classifier.config.to_dict(), "val_accuracy": cls_info.get("val_accuracy"),
                          "n_val": cls_info.get("n_val"), "heldout_pairs_accuracy": check,
                          "train_seconds": cls_info.get("train_seconds"), "trained_on": cls_info.get("data")}

  clip: dict[str, Any] = {"available": bool(pipe.has_image_encoder)}
  held = heldout_mask(target["colour"], target["shape"], holdout)
  if pipe.has_image_encoder:
    t0 = time.perf_counter()
    gen_scores = clip_score(pipe, images, [p.text for p in prompts])
    n = dataset_size(data_dir)
    k = min(n, n_prompts if n_real is None else int(n_real))
    real_images, _, captions = load_real(data_dir, np.arange(n - k, n))
    real_scores = clip_score(pipe, real_images, captions)
    wrong = clip_score(pipe, real_images, captions[1:] + captions[:1]) if k > 1 else np.zeros((0,))
    clip.update(generated=_mean(gen_scores), generated_seen=_mean(gen_scores[~held]),
                generated_heldout=_mean(gen_scores[held]), real=_mean(real_scores), real_n=k,
                real_mismatched=_mean(wrong))
    timing["clip_seconds"] = time.perf_counter() - t0
  report["clip_score"] = clip
  report["per_prompt"] = [
      {"prompt": p.text, "heldout": bool(held[i]), "target": {k: HEAD_NAMES[k][target[k][i]] for k in HEADS},
       "pred": {k: HEAD_NAMES[k][pred[k][i]] for k in HEADS},
       "clip_score": float(gen_scores[i]) if pipe.has_image_encoder else None}
      for i, p in enumerate(prompts)]
  timing["total_seconds"] = time.perf_counter() - t_start
  report["timing"] = {k: round(v, 2) for k, v in timing.items()}
  return report


def pool_adherence(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """`adherence` over the images of several reports (e.g. one per seed) pooled, from their per-prompt entries.
  All reports must share the held-out pairs."""
  if not reports:
    raise ValueError("no reports to pool")
  holdouts = {json.dumps(r["holdout"]) for r in reports}
  if len(holdouts) != 1:
    raise ValueError(f"reports with different held-out pairs cannot be pooled: {sorted(holdouts)}")
  rows = [e for r in reports for e in r["per_prompt"]]
  ids = lambda part: {k: np.array([HEAD_NAMES[k].index(e[part][k]) for e in rows], np.int32) for k in HEADS}
  return adherence(ids("pred"), ids("target"), [tuple(p) for p in reports[0]["holdout"]])


def format_table(report: Mapping[str, Any]) -> str:
  """The report as a short text table."""
  def f(x, spec=".3f"):
    return "-" if x is None else format(x, spec)

  lines = []
  c = report["classifier"]
  v = c.get("val_accuracy") or {}
  lines.append(f"classifier validation accuracy (n={c.get('n_val')} real images): colour {f(v.get('colour'))}  "
               f"shape {f(v.get('shape'))}  background {f(v.get('background'))}  all {f(v.get('all_three'))}")
  h = c.get("heldout_pairs_accuracy")
  if h:
    lines.append(f"classifier on drawn held-out pairs (n={h['n']}): colour {f(h['colour'])}  shape {f(h['shape'])}  "
                 f"background {f(h['background'])}  all {f(h['all_three'])}")
  clip = report["clip_score"]
  lines.append(f"{'group':<9}{'n':>5}{'colour':>9}{'shape':>9}{'backgr.':>9}{'all 3':>9}{'CLIP':>8}")
  for g in GROUPS:
    a = report["adherence"][g]
    score = clip.get({"all": "generated", "seen": "generated_seen", "heldout": "generated_heldout"}[g])
    lines.append(f"{g:<9}{a['n']:>5}{f(a['colour']):>9}{f(a['shape']):>9}{f(a['background']):>9}"
                 f"{f(a['all_three']):>9}{f(score, '.2f'):>8}")
  if clip.get("available"):
    lines.append(f"{'real':<9}{clip['real_n']:>5}{'':>36}{f(clip['real'], '.2f'):>8}   "
                 f"(mismatched captions {f(clip['real_mismatched'], '.2f')})")
  lines.append("timing: " + ", ".join(f"{k.replace('_seconds', '')} {v:.1f}s" for k, v in report["timing"].items()))
  return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
  from unclip_jax import sample

  p = argparse.ArgumentParser(prog="python -m unclip_jax.shapes.evaluate", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--bundle", default=None, help="model bundle folder (default: the embedded model)")
  p.add_argument("--data", required=True, help="shapes dataset dir (python -m unclip_jax.shapes.data)")
  p.add_argument("--classifier", default=None, help="classifier folder; trained and saved there if missing")
  p.add_argument("--classifier-data", default=None, help="dataset to train the classifier on (default --data)")
  p.add_argument("--classifier-steps", type=int, default=400)
  p.add_argument("--classifier-seed", type=int, default=0)
  p.add_argument("--n-prompts", type=int, default=96, help=f"prompts (one image each), at most {max_prompts()}")
  p.add_argument("--seed", type=int, default=0, help="generation seed")
  p.add_argument("--seeds", default=None, help='several generation seeds, e.g. "0,1,2": one report per seed and '
                                               "their pooled adherence (overrides --seed)")
  p.add_argument("--batch-size", type=int, default=24)
  p.add_argument("--holdout", default=None, help='held-out pairs, e.g. "red circle,blue square" (default: the '
                                                 "dataset's metadata)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  p.add_argument("--out", default=None, help="write the JSON report here")
  sample._stage_flags(p)
  return p


def write_report(path, report: Mapping[str, Any]) -> None:
  """The JSON report, written atomically (parent folders created; local or gs://)."""
  from unclip_jax import paths

  p = paths.as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  paths.write_bytes_atomic(p, json.dumps(report, indent=1, default=str).encode("utf-8"))


def parse_seeds(text: str) -> list[int]:
  """ "0,1,2" -> [0, 1, 2] (distinct non-negative integers)."""
  try:
    seeds = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f"--seeds must list distinct non-negative integers, got {text!r}")
  return seeds


def run_cli(make_parser, run, argv: Sequence[str] | None = None) -> int:
  """Parses argv with `make_parser()` and calls `run(args)`; a bad input (missing file, bad value or key) is one
  "error: ..." line on stderr and exit code 2."""
  args = make_parser().parse_args(argv)
  try:
    return run(args)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(parser, _run, argv)


def _run(args: argparse.Namespace) -> int:
  from unclip_jax import sample

  if args.n_prompts < 1 or args.n_prompts > max_prompts():
    raise ValueError(f"--n-prompts must be in [1, {max_prompts()}], got {args.n_prompts}")
  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
  holdout = None if args.holdout is None else shapes.parse_holdout(args.holdout)
  seeds = [args.seed] if args.seeds is None else parse_seeds(args.seeds)
  bundle_path = pathlib.Path(args.bundle) if args.bundle else sample.DEFAULT_BUNDLE
  if args.bundle is None and not bundle_path.is_dir():
    raise FileNotFoundError(f"no --bundle given and this installation has no embedded default model at "
                            f"{bundle_path}; train one with `bash launch/train_shapes.sh` or pass --bundle")
  dataset_metadata(args.data)          # fails early on a missing / wrong dataset dir
  t0 = time.perf_counter()
  clf, trained = get_classifier(args.classifier_data or args.data, args.classifier, seed=args.classifier_seed,
                                steps=args.classifier_steps, log=lambda m: print(m, file=sys.stderr))
  t_clf = time.perf_counter() - t0

  from unclip_jax.inference.pipeline import UnCLIP

  pipe = UnCLIP.from_bundle(bundle_path, sampling=sample.sampling_overrides(args),
                            dtype=sample.resolve_dtype(args.dtype))
  reports = []
  for seed in seeds:
    report = evaluate(pipe, args.data, clf, n_prompts=args.n_prompts, seed=seed, batch_size=args.batch_size,
                      holdout=holdout)
    report["bundle"] = str(bundle_path)
    report["data"] = str(args.data)
    report["settings"] = pipe.settings()
    report["classifier"].update(path=args.classifier, trained_now=trained)
    report["timing"]["classifier_seconds"] = round(t_clf, 2)
    if len(seeds) > 1:
      print(f"seed {seed}:")
    print(format_table(report))
    reports.append(report)
  if len(seeds) > 1:
    pooled = pool_adherence(reports)
    print(f"pooled over seeds {seeds} ({pooled['all']['n']} images): all three {pooled['all']['all_three']:.3f}  "
          f"seen {pooled['seen']['all_three']:.3f}  held-out "
          + ("-" if pooled["heldout"]["all_three"] is None else f"{pooled['heldout']['all_three']:.3f}")
          + f" (n={pooled['heldout']['n']})")
    report = {"seeds": seeds, "pooled": pooled, "reports": reports}
  if args.out:
    write_report(args.out, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
