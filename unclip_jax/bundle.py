"""The sampling-ready model bundle: one folder per component, config JSON + safetensors params.

  BUNDLE/bundle.json                   {"format": "unclip_jax.bundle", "schema": 1, "unclip_jax": __version__,
                                        "components": [...], "source": "...",
                                        "files": {"<component>/params.safetensors": {"size": N, "sha256": "…"}, …}}
  BUNDLE/<component>/config.json       the stage ConfigDict (as `configs/<stage>.py` gives it) as JSON
  BUNDLE/<component>/params.safetensors  params flattened with "/"-joined Flax paths (float32, or bf16/fp16)

Components and their stages: "clip" (clip; text-only or both towers), "prior" (prior), "decoder" (decoder; params
{"unet": ..., "text_proj": ...}, or {"unet", "text_encoder"} with the GLIDE text pathway), "super_res_first" and
"super_res_last" (upsampler; the last one optional). Models are built from the stored configs by the stage modules
(`unclip_jax.stages`); loading checks every parameter name and shape against `jax.eval_shape` of that model.
Configs saved by older versions are completed with the fields added since (`config_lib.complete`).

A component is written into a temporary folder and renamed into place, so an interrupted write never leaves a
half component (at worst the old one or none). Nothing is pickled: JSON and safetensors only.

Integrity: the manifest's "files" holds the size and sha256 of every component file. `load_component` checks the
component's files against it before reading them (about 1 ms per MB); `verify=False` (`--no-verify` in
`python -m unclip_jax.sample`) skips that for large bundles. Bundles written before the record existed have nothing
to check against and load with a one-line note (logged at INFO).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any, Mapping

import jax
import ml_collections as mlc
import numpy as np

import unclip_jax
from unclip_jax import config_lib, paths
from unclip_jax.ckpt import integrity

log = logging.getLogger(__name__)

FORMAT = "unclip_jax.bundle"
SCHEMA = 1
MANIFEST_NAME = "bundle.json"
CONFIG_NAME = "config.json"
PARAMS_NAME = "params.safetensors"
COMPONENT_FILES = (CONFIG_NAME, PARAMS_NAME)
COMPONENT_STAGES = {"clip": "clip", "prior": "prior", "decoder": "decoder", "super_res_first": "upsampler",
                    "super_res_last": "upsampler"}
COMPONENTS = tuple(COMPONENT_STAGES)
DTYPES = ("float32", "bfloat16", "float16")

Params = dict[str, Any]
PathLike = str | os.PathLike


# ---- models and expected trees ----------------------------------------------------------------------------------
def abstract_params(cfg) -> Params:
  """`jax.eval_shape` of the param tree of the model(s) `cfg` (a stage config) describes."""
  from unclip_jax import stages

  stage = cfg.get("stage") if hasattr(cfg, "get") else None
  if stage not in set(COMPONENT_STAGES.values()):
    raise ValueError(f"config stage {stage!r} has no bundle component "
                     f"(stages: {sorted(set(COMPONENT_STAGES.values()))})")
  return stages.get(stage).abstract_params(cfg)


def _flat_leaves(tree) -> dict[str, Any]:
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flatten_params(params: Params) -> dict[str, np.ndarray]:
  """Nested params -> {"a/b/kernel": numpy array}."""
  return {k: np.asarray(v) for k, v in _flat_leaves(params).items()}


def unflatten_params(flat: Mapping[str, Any]) -> Params:
  """{"a/b/kernel": array} -> nested dict."""
  out: Params = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def check_params(params: Params, cfg, what: str = "params") -> None:
  """Checks names and shapes against the model built from `cfg`; a ValueError names the first bad key."""
  expected = {k: tuple(v.shape) for k, v in _flat_leaves(abstract_params(cfg)).items()}
  flat = _flat_leaves(params)
  for key in sorted(flat):
    if key not in expected:
      raise ValueError(f"{what}: unexpected parameter {key!r} (not in the model built from the config)")
    if tuple(np.shape(flat[key])) != expected[key]:
      raise ValueError(f"{what}: parameter {key!r} has shape {tuple(np.shape(flat[key]))}, the model expects "
                       f"{expected[key]}")
  missing = sorted(k for k in expected if k not in flat)
  if missing:
    raise ValueError(f"{what}: missing parameter {missing[0]!r} ({len(missing)} missing in all)")


def param_count(params: Params) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


# ---- components -------------------------------------------------------------------------------------------------
def _check_name(name: str) -> str:
  if name not in COMPONENT_STAGES:
    raise ValueError(f"unknown bundle component {name!r}; choose one of {COMPONENTS}")
  return COMPONENT_STAGES[name]


def _np_dtype(dtype: str | None):
  dtype = dtype or "float32"
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  if dtype == "bfloat16":
    import ml_dtypes

    return ml_dtypes.bfloat16
  return np.dtype(dtype)


def save_component(root: PathLike, name: str, cfg, params: Params, dtype: str | None = None) -> pathlib.Path:
  """Writes BUNDLE/<name>/{config.json, params.safetensors} atomically and updates bundle.json.

  Args:
    root: the bundle folder (created if missing).
    name: one of COMPONENTS; `cfg.stage` must be its stage.
    cfg: the stage ConfigDict (its `model` block builds the model).
    params: the param tree; checked against the model before anything is written.
    dtype: "float32" (default), "bfloat16" or "float16" storage; loading always returns float32.
  Returns:
    the component folder.
  """
  stage = _check_name(name)
  if cfg.get("stage") != stage:
    raise ValueError(f"component {name!r} needs a {stage!r} stage config, got stage {cfg.get('stage')!r}")
  np_dtype = _np_dtype(dtype)
  check_params(params, cfg, f"component {name!r}")
  from safetensors.numpy import save_file

  if paths.is_remote(root):
    return _save_component_remote(paths.as_path(root), name, cfg, params, np_dtype, dtype)
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  final = root / name
  tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
      json.dump(config_lib.to_dict(cfg), f, indent=2, sort_keys=True)
    tensors = {k: np.array(np.asarray(v, np.float32).astype(np_dtype), order="C")     # keeps 0-d leaves 0-d
               for k, v in flatten_params(params).items()}
    save_file(tensors, str(tmp / PARAMS_NAME),
              metadata={"format": FORMAT, "component": name, "dtype": dtype or "float32"})
    files = {f"{name}/{f}": integrity.file_digest(tmp / f) for f in COMPONENT_FILES}
    old = None
    if final.exists():
      old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
      os.rename(final, old)
    try:
      os.rename(tmp, final)
    except BaseException:
      if old is not None:
        os.rename(old, final)          # put the previous component back
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  manifest = read_manifest_or_none(root)
  write_manifest(root, source=(manifest or {}).get("source", ""), files=files)
  return final


def _save_component_remote(root, name: str, cfg, params: Params, np_dtype, dtype: str | None):
  """save_component on object storage (no rename): each file is one upload of its final object, config first,
  then params, then bundle.json with their digests. A reader that verifies (the default) rejects a component
  whose files do not match bundle.json, so an interrupted update is detected, never loaded silently."""
  from safetensors.numpy import save

  tensors = {k: np.array(np.asarray(v, np.float32).astype(np_dtype), order="C")
             for k, v in flatten_params(params).items()}
  blobs = {CONFIG_NAME: json.dumps(config_lib.to_dict(cfg), indent=2, sort_keys=True).encode(),
           PARAMS_NAME: save(tensors, metadata={"format": FORMAT, "component": name, "dtype": dtype or "float32"})}
  final = root / name
  final.mkdir(parents=True, exist_ok=True)
  files = {}
  for fname in COMPONENT_FILES:
    (final / fname).write_bytes(blobs[fname])
    files[f"{name}/{fname}"] = {"size": len(blobs[fname]), "sha256": hashlib.sha256(blobs[fname]).hexdigest()}
  manifest = read_manifest_or_none(root)
  write_manifest(root, source=(manifest or {}).get("source", ""), files=files)
  return final


def read_json(path, what: str):
  """A JSON file; FileNotFoundError / ValueError naming `what` and the path when missing or corrupt."""
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found: {path}")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"corrupt {what} {path}: {e}") from e


def load_component(root: PathLike, name: str, *, verify: bool = True) -> tuple[mlc.ConfigDict, Params]:
  """Reads BUNDLE/<name> -> (stage ConfigDict, float32 params), checked against the model.

  With `verify` (default) the component's files are first checked against the size + sha256 record in
  bundle.json (a bundle without one loads with a note); `verify=False` skips that (e.g. for multi-GB bundles).

  Raises:
    FileNotFoundError: the bundle, component folder, config.json or params.safetensors is missing (names it).
    integrity.IntegrityError (a ValueError): a file differs from the manifest's record (names it).
    ValueError: corrupt JSON or safetensors (names the file), a config of the wrong stage, or params that do not
      match the model built from the config (names the first bad key).
  """
  stage = _check_name(name)
  folder = paths.as_path(root) / name
  if not folder.is_dir():
    raise FileNotFoundError(f"bundle component folder not found: {folder}")
  for fname, what in ((CONFIG_NAME, "component config"), (PARAMS_NAME, "component params")):
    if not (folder / fname).is_file():
      raise FileNotFoundError(f"{what} not found: {folder / fname}")
  if verify:
    verify_component(root, name)
  d = read_json(folder / CONFIG_NAME, "component config")
  if not isinstance(d, dict):
    raise ValueError(f"corrupt component config {folder / CONFIG_NAME}: not a JSON object")
  if d.get("stage") != stage:
    raise ValueError(f"{folder / CONFIG_NAME}: component {name!r} needs stage {stage!r}, got {d.get('stage')!r}")
  try:
    cfg = config_lib.complete(d)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
  from unclip_jax.convert import torch_layout

  path = folder / PARAMS_NAME
  try:
    flat = torch_layout.read_safetensors(path)
  except ValueError as e:
    raise ValueError(f"corrupt params file {path}: {e}") from e
  params = unflatten_params({k: np.asarray(v).astype(np.float32, copy=False) for k, v in flat.items()})
  check_params(params, cfg, f"{path}")
  return cfg, params


def list_components(root: PathLike) -> list[str]:
  """Components present in the bundle (folder with config.json and params.safetensors), in COMPONENTS order."""
  root = paths.as_path(root)
  return [n for n in COMPONENTS if (root / n / CONFIG_NAME).is_file() and (root / n / PARAMS_NAME).is_file()]


# ---- manifest ---------------------------------------------------------------------------------------------------
def write_manifest(root: PathLike, *, source: str = "", components: list[str] | None = None,
                   files: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """Writes BUNDLE/bundle.json atomically (components default to those present), with the size + sha256 of every
  component file: taken from `files`, else from the previous manifest when the size still matches, else hashed
  now. Returns the manifest."""
  root = paths.as_path(root)
  root.mkdir(parents=True, exist_ok=True)
  comps = list_components(root) if components is None else list(components)
  for c in comps:
    _check_name(c)
  known = {**((read_manifest_or_none(root) or {}).get("files") or {}), **(files or {})}
  records = {}
  for c in comps:
    for fname in COMPONENT_FILES:
      rel = f"{c}/{fname}"
      old = known.get(rel)
      same_size = isinstance(old, dict) and old.get("size") == _size(root / rel)
      records[rel] = dict(old) if same_size else integrity.file_digest(root / rel)
  manifest = {"format": FORMAT, "schema": SCHEMA, "unclip_jax": unclip_jax.__version__, "components": comps,
              "source": source, "files": records}
  if paths.is_remote(root):                  # one upload of the final object: atomic on object storage
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest
  tmp = root / f".{MANIFEST_NAME}.{uuid.uuid4().hex[:8]}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, root / MANIFEST_NAME)
  return manifest


def _size(path) -> int:
  return int(path.stat().length) if paths.is_remote(path) else path.stat().st_size


def verify_component(root: PathLike, name: str) -> bool:
  """Checks BUNDLE/<name>'s files against bundle.json's record. True when verified; False (with an INFO note) when
  the bundle has no record for it. Raises integrity.IntegrityError naming the file when one differs, and
  FileNotFoundError / ValueError when bundle.json exists but is unreadable."""
  root = paths.as_path(root)
  manifest = read_manifest(root) if (root / MANIFEST_NAME).exists() else None
  files = (manifest or {}).get("files") or {}
  wanted = {f"{name}/{f}": files[f"{name}/{f}"] for f in COMPONENT_FILES if f"{name}/{f}" in files}
  if len(wanted) < len(COMPONENT_FILES):
    log.info("bundle %s has no integrity record for component %r (written by an older unclip_jax); loading it "
             "unverified", root, name)
    return False
  try:
    integrity.check_files(root, wanted)
  except integrity.IntegrityError as e:
    raise integrity.IntegrityError(
        f"bundle component {name!r} in {root} is damaged: {e}; re-export or re-convert it (verify=False, or "
        f"--no-verify in `python -m unclip_jax.sample`, loads it anyway)", e.path) from e
  return True


def verify_bundle(root: PathLike) -> list[str]:
  """Checks every component present against bundle.json's record; returns those verified (see verify_component)."""
  return [name for name in list_components(root) if verify_component(root, name)]


def read_manifest(root: PathLike) -> dict[str, Any]:
  """BUNDLE/bundle.json, checked: the format name, a schema this code reads, and components that exist."""
  root = paths.as_path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"bundle folder not found: {root}")
  path = root / MANIFEST_NAME
  m = read_json(path, "bundle manifest")
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    fmt = m.get("format") if isinstance(m, dict) else None
    raise ValueError(f"{path} is not an unclip_jax bundle manifest (format {fmt!r}, expected {FORMAT!r})")
  if not isinstance(m.get("schema"), int) or m["schema"] > SCHEMA:
    raise ValueError(f"{path}: bundle schema {m.get('schema')!r} is not readable by this unclip_jax (schema {SCHEMA})")
  for c in m.get("components", []):
    _check_name(c)
    if not (root / c).is_dir():
      raise FileNotFoundError(f"{path} lists component {c!r} but {root / c} does not exist")
  return m


def read_manifest_or_none(root):
  """The manifest, or None when it is missing or unreadable."""
  try:
    return read_manifest(root)
  except (FileNotFoundError, ValueError):
    return None


# ---- training checkpoints ---------------------------------------------------------------------------------------
def export_from_training(workdir: PathLike, bundle_root: PathLike, component: str, *, step: int | None = None,
                         dtype: str | None = None, which: str = "ema_params") -> tuple[mlc.ConfigDict, Params]:
  """Latest (or `step`) orbax checkpoint in WORKDIR/checkpoints -> EMA params (or the raw ones, `which="params"`,
  e.g. for a run stopped before its EMA caught up) + the saved config -> a component.

  The run's config must be of the component's stage (decoder params are {"unet", "text_proj"}). Returns the
  exported (config, params).
  """
  from unclip_jax.ckpt import manager

  stage = _check_name(component)
  if not paths.as_path(workdir).is_dir():
    raise FileNotFoundError(f"no training checkpoints at {paths.as_path(workdir) / 'checkpoints'}")
  params, config, meta = manager.restore_params(workdir, step=step, which=which)
  cfg = config_lib.complete(config)
  if cfg.get("stage") != stage:
    raise ValueError(f"{workdir}: the run trained stage {cfg.get('stage')!r}; component {component!r} needs a "
                     f"{stage!r} run")
  save_component(bundle_root, component, cfg, params, dtype=dtype)
  manifest = read_manifest_or_none(paths.as_path(bundle_root)) or {}
  # One "component: origin" entry per component; re-exporting a component replaces its entry.
  entries = [e for e in manifest.get("source", "").split("; ") if e and not e.startswith(f"{component}: ")]
  entries.append(f"{component}: training:{os.fspath(workdir)}@{meta['step']}")
  write_manifest(bundle_root, source="; ".join(entries))
  return cfg, params
