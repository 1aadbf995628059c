"""Mesh, sharding rules, the generic train step (sharded == single device), NaN skipping, checkpoints."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import config_lib
from unclip_jax.ckpt import manager as ckpt
from unclip_jax.data import global_batch
from unclip_jax.parallel import mesh as mesh_lib, partitioning
from unclip_jax.train import optim, state as state_lib, step as step_lib


class ToyMLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x, *, rng=None):
    dense = lambda f, names, name: nn.Dense(
        f, name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names))
    h = nn.gelu(dense(self.hidden, ("embed", "mlp"), "fc1")(x))
    if rng is not None:
      h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    return dense(x.shape[-1], ("mlp", "embed"), "fc2")(h)


def _cfg(**optim_overrides):
  cfg = config_lib.base_config("prior")
  cfg.num_train_steps = 100
  cfg.optim.update(dict(dict(lr=1e-2, warmup_steps=0, ema_decay=0.9), **optim_overrides))
  return cfg


def _batch(step, n=16, d=8):
  rng = np.random.default_rng(step)
  x = rng.standard_normal((n, d)).astype(np.float32)
  return {"x": x, "y": np.tanh(x[:, ::-1]).copy()}


def _loss_fn(model):
  def loss_fn(params, batch, rng):
    pred = model.apply({"params": params}, batch["x"], rng=rng)
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss}
  return loss_fn


def _train(mesh_sizes, steps=3, cfg=None):
  cfg = cfg or _cfg()
  model = ToyMLP()
  tx = optim.make_optimizer(cfg)
  mesh = mesh_lib.make_mesh(mesh_sizes)
  with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.axis_rules):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"])
    p_sh = partitioning.param_shardings(abstract, mesh, cfg.axis_rules, min_bytes=0)
    init_state = lambda: state_lib.TrainState.create(nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]), tx)
    abstract_state = jax.eval_shape(init_state)
    st_sh = state_lib.TrainState(step=NamedSharding(mesh, P()), params=p_sh, ema_params=p_sh,
                                 opt_state=jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state.opt_state))
    # optimiser moments follow their parameters
    st_sh = st_sh.replace(opt_state=_opt_shardings(abstract_state.opt_state, abstract_state.params, p_sh, mesh))
    state = jax.jit(init_state, out_shardings=st_sh)()
    b_sh = global_batch.batch_sharding(mesh, 2)
    train_step = jax.jit(step_lib.make_train_step(_loss_fn(model), tx, ema_decay=cfg.optim.ema_decay,
                                                  grad_accum=cfg.optim.grad_accum),
                         in_shardings=(st_sh, b_sh, NamedSharding(mesh, P())), out_shardings=(st_sh, None),
                         donate_argnums=0)
    metrics = []
    for i in range(steps):
      batch = jax.tree.map(lambda a: jax.device_put(a, b_sh), _batch(i))
      state, m = train_step(state, batch, jax.random.key(42))
      metrics.append(jax.device_get(m))
  return state, metrics, mesh


def _opt_shardings(opt_state, params, param_sh, mesh):
  """Adam moments mirror the parameter tree: give them the parameters' shardings, scalars replicate."""
  struct = jax.tree.structure(params)

  def assign(sub):
    if jax.tree.structure(sub) == struct:
      return param_sh
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), sub)

  return jax.tree.map(assign, opt_state, is_leaf=lambda s: jax.tree.structure(s) == struct)


def test_mesh_shapes_and_errors():
  assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="needs 12 devices, but 8"):
    mesh_lib.mesh_shape({"data": 3, "fsdp": 4, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_lib.mesh_shape({"dp": 8}, 8)


@pytest.mark.parametrize("sizes", [{"data": 2, "fsdp": 4, "tensor": 1}, {"data": 8, "fsdp": 1, "tensor": 1},
                                   {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_train_step_equals_single_device(sizes):
  single, single_metrics, _ = _train_single()
  sharded, sharded_metrics, mesh = _train(sizes)
  np.testing.assert_allclose([m["loss"] for m in sharded_metrics], [m["loss"] for m in single_metrics], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  if sizes["fsdp"] > 1:
    partitioning.assert_sufficiently_sharded(sharded.params)
  assert int(sharded.step) == 3


def _train_single():
  cfg = _cfg()
  model = ToyMLP()
  tx = optim.make_optimizer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
  state = state_lib.TrainState.create(nn.unbox(params), tx)
  train_step = jax.jit(step_lib.make_train_step(_loss_fn(model), tx, ema_decay=cfg.optim.ema_decay))
  metrics = []
  for i in range(3):
    state, m = train_step(state, _batch(i), jax.random.key(42))
    metrics.append(jax.device_get(m))
  return state, metrics, None


def _fresh_state(cfg, model, tx):
  return state_lib.TrainState.create(nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]), tx)


def test_fsdp_fallback_and_replication_check():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  abstract = {"big": jax.ShapeDtypeStruct((1024, 1536), jnp.float32), "bias": jax.ShapeDtypeStruct((6,), jnp.float32)}
  sh = partitioning.param_shardings(abstract, mesh, config_lib.AXIS_RULES, min_bytes=1 << 20)
  assert sh["big"].spec == P(None, "fsdp") and sh["bias"].spec == P()
  replicated = {"w": jax.device_put(jnp.zeros((64, 64)), NamedSharding(mesh, P()))}
  with pytest.raises(AssertionError, match="100.0% of parameter bytes are fully replicated"):
    partitioning.assert_sufficiently_sharded(replicated)


def test_non_finite_steps_are_skipped():
  cfg = _cfg()
  model = ToyMLP()
  tx = optim.make_optimizer(cfg)
  state = _fresh_state(cfg, model, tx)
  train_step = jax.jit(step_lib.make_train_step(_loss_fn(model), tx, ema_decay=0.9))
  bad = _batch(0)
  bad["y"][0, 0] = np.nan
  new, metrics = train_step(state, bad, jax.random.key(0))
  assert int(metrics["skipped"]) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((new.params, new.ema_params, new.opt_state)),
                  jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good, metrics = train_step(new, _batch(1), jax.random.key(0))
  assert int(metrics["skipped"]) == 0
  assert not np.allclose(np.asarray(good.params["fc1"]["kernel"]), np.asarray(state.params["fc1"]["kernel"]))


def test_gradient_accumulation_updates_every_k_steps():
  cfg = _cfg(grad_accum=2)
  model = ToyMLP()
  tx = optim.make_optimizer(cfg)
  state = _fresh_state(cfg, model, tx)
  train_step = jax.jit(step_lib.make_train_step(_loss_fn(model), tx, ema_decay=0.9, grad_accum=2))
  s1, _ = train_step(state, _batch(0), jax.random.key(0))
  kernel = lambda s, tree="params": np.asarray(getattr(s, tree)["fc1"]["kernel"])
  np.testing.assert_array_equal(kernel(s1), kernel(state))
  np.testing.assert_array_equal(kernel(s1, "ema_params"), kernel(state, "ema_params"))
  s2, _ = train_step(s1, _batch(1), jax.random.key(0))
  assert not np.allclose(kernel(s2), kernel(state))
  assert not np.allclose(kernel(s2, "ema_params"), kernel(state, "ema_params"))


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="optim.lr must be positive"):
    optim.make_optimizer(_cfg(lr=0.0))
  with pytest.raises(ValueError, match="grad_accum"):
    optim.make_optimizer(_cfg(grad_accum=0))


def test_checkpoint_resume_is_exact(tmp_path):
  cfg = _cfg()
  model = ToyMLP()
  tx = optim.make_optimizer(cfg)
  train_step = jax.jit(step_lib.make_train_step(_loss_fn(model), tx, ema_decay=0.9))
  init = _fresh_state(cfg, model, tx)

  straight = init
  for i in range(6):
    straight, _ = train_step(straight, _batch(i), jax.random.key(7))

  mngr = ckpt.CheckpointManager(tmp_path / "ckpt", max_to_keep=2)
  state = init
  for i in range(3):
    state, _ = train_step(state, _batch(i), jax.random.key(7))
    mngr.save(int(state.step), state, config=cfg.to_dict(), stage="prior")
  mngr.wait()
  assert mngr.all_steps() == [2, 3]                       # keep-N
  assert mngr.restore_config()["stage"] == "prior"

  resumed_mngr = ckpt.CheckpointManager(tmp_path / "ckpt")
  restored, meta = resumed_mngr.restore(ckpt.abstract_with_shardings(jax.eval_shape(lambda: init)))
  assert meta["schema"] >= 1 and meta["stage"] == "prior" and int(restored.step) == 3
  for i in range(int(restored.step), 6):
    restored, _ = train_step(restored, _batch(i), jax.random.key(7))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  mngr = ckpt.CheckpointManager(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    mngr.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_learning_rate_warms_up_then_decays():
  cfg = _cfg(warmup_steps=10)
  schedule = optim.learning_rate_schedule(cfg)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1e-2, rtol=1e-6)
  assert float(schedule(55)) < 1e-2 and float(schedule(100)) < 1e-5


def test_frozen_parameters_and_weight_decay_mask():
  cfg = _cfg(weight_decay=0.5, frozen=("clip_std",))
  params = {"clip_std": jnp.ones((1, 4)), "clip_mean": jnp.ones((1, 4)), "proj": {"kernel": jnp.ones((4, 4)),
                                                                                  "bias": jnp.ones((4,))}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"clip_std": False, "clip_mean": False, "proj": {"kernel": True, "bias": False}}
  tx = optim.make_optimizer(cfg)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.max(jnp.abs(updates["clip_std"]))) == 0.0
  assert float(jnp.max(jnp.abs(updates["proj"]["kernel"]))) > 0.0


@pytest.mark.parametrize("spec", ["prior:tiny", "decoder:tiny", "ar_prior:tiny"])
def test_adam_moments_follow_the_param_shardings(spec):
  """Adam's moments are sharded like their parameters even where optax nests them in partitioned / masked states
  with frozen parameters masked out (the prior's CLIP statistics, the AR prior's PCA): they used to fall back to
  full replication there, 8 bytes per parameter on every chip."""
  from unclip_jax import stages
  from unclip_jax.train import loop

  cfg = config_lib.load_config(spec, [])
  params = stages.get(cfg.stage).abstract_params(cfg)
  tx = optim.make_optimizer(cfg)
  abstract = jax.eval_shape(lambda p: state_lib.TrainState.create(p, tx), params)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  # every parameter with a dimension divisible by 4 sharded over fsdp, the rest replicated
  spec_of = lambda x: P(*[("fsdp" if i == next((d for d, n in enumerate(x.shape) if n % 4 == 0), None) else None)
                          for i in range(x.ndim)])
  param_sh = jax.tree.map(lambda x: NamedSharding(mesh, spec_of(x)), params)
  state_sh = loop.state_shardings(abstract, param_sh, mesh)
  labels = jax.tree.leaves(optim.frozen_labels(params, tuple(cfg.optim.frozen)))
  moments = [sh for path, sh in jax.tree_util.tree_flatten_with_path(state_sh.opt_state)[0]
             if any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
  want = [str(sh.spec) for sh, label in zip(jax.tree.leaves(param_sh), labels) if label == "train"] * 2
  assert sorted(str(sh.spec) for sh in moments) == sorted(want)
  assert any(sh.spec != P() for sh in moments)
  others = [sh for path, sh in jax.tree_util.tree_flatten_with_path(state_sh.opt_state)[0]
            if not any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
  assert all(sh.spec == P() for sh in others)                 # counts and schedule state


def test_ema_warmup_follows_the_weights_early():
  """With warmup the n-th EMA update uses min(decay, (1+n)/(10+n)); without it a constant decay."""
  n = jnp.arange(4)
  np.testing.assert_allclose(step_lib.ema_decay_at(0.999, n, True), [0.1, 2 / 11, 3 / 12, 4 / 13], rtol=1e-6)
  np.testing.assert_allclose(step_lib.ema_decay_at(0.5, jnp.asarray(1000), True), 0.5)
  np.testing.assert_allclose(step_lib.ema_decay_at(0.999, n, False), [0.999] * 4, rtol=1e-7)
  params = {"w": jnp.zeros(3)}
  loss = lambda p, batch, rng: (jnp.sum((p["w"] - 1.0) ** 2), {})
  tx = optax.sgd(0.25)
  for warmup, want_ema in ((True, 0.9 * 0.5), (False, 0.001 * 0.5)):   # w: 0 -> 0.5 after one step
    state = state_lib.TrainState.create(params, tx)
    step = jax.jit(step_lib.make_train_step(loss, tx, ema_decay=0.999, ema_warmup=warmup))
    state, _ = step(state, {}, jax.random.key(0))
    np.testing.assert_allclose(state.params["w"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], want_ema, rtol=1e-4)
