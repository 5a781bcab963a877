"""`model.dtype='bfloat16'`: bfloat16 compute, float32 parameters, optimizer state and losses.

Stated tolerances (measured on the :test config, squares batches, 6 steps:
the reconstruction loss differed by at most 0.7 %, the total by at most
8.7 %, every term of the first step by at most 2.6 %):
- first step, every loss term: within 5 % of float32 (same weights, only
  the rounding of the activations differs);
- steps 1-4: reconstruction loss within 2 %, total loss within 15 % (the
  runs drift apart as the keypoints move by different sub-pixel amounts).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tetrominoes
from tests.synthetic import squares
from tusk_jax import models, perceptual
from tusk_jax import state as state_lib
from tusk_jax import step as step_lib

NUM_STEPS = 4


def make_config(dtype):
    config = tetrominoes.get_config("test")
    with config.unlocked():
        config.model.dtype = dtype
    return config


@functools.cache
def run(dtype):
    """(per-step metrics, final host state) of NUM_STEPS steps on one device."""
    config = make_config(dtype)
    model = models.create_model(config)
    cfg = step_lib.StepConfig.from_config(config, model)
    devices = jax.devices()[:1]
    step = jax.pmap(
        functools.partial(step_lib.train_step, cfg=cfg), axis_name=step_lib.AXIS, devices=devices
    )
    state = state_lib.replicate(state_lib.create_train_state(config, model), devices=devices)
    history = []
    for i in range(NUM_STEPS):
        state, metrics = step(state, squares(i, config.train.batch_size)[None], None)
        history.append({k: float(v[0]) for k, v in metrics.items()})
    return history, jax.device_get(state_lib.unreplicate(state))


def relative(a, b):
    return abs(a - b) / max(abs(a), 1e-8)


def test_bfloat16_steps_track_float32_and_stay_finite():
    full, _ = run("float32")
    half, state = run("bfloat16")
    losses = [name for name in full[0] if name.startswith("loss/")]
    assert {"loss/recon", "loss/total", "loss/sw"} <= set(losses)
    for step, metrics in enumerate(half):
        assert all(np.isfinite(v) for v in metrics.values()), (step, metrics)
    for name in losses:
        assert relative(full[0][name], half[0][name]) < 0.05, name
    for step in range(1, NUM_STEPS):
        assert relative(full[step]["loss/recon"], half[step]["loss/recon"]) < 0.02, step
        assert relative(full[step]["loss/total"], half[step]["loss/total"]) < 0.15, step
    # The option does something: the losses are not float32's to the bit.
    assert any(full[0][name] != half[0][name] for name in losses)
    # Parameters, prototypes and optimizer moments stay float32.
    floats = [
        leaf
        for leaf in jax.tree_util.tree_leaves(state)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)


def test_bfloat16_model_convolves_in_bfloat16_and_returns_float32():
    config = make_config("bfloat16")
    model = models.create_model(config)
    size = config.dataset.image_size
    images = jnp.asarray(squares(0, 2, size))
    variables = models.create_model(make_config("float32")).init(jax.random.key(0), images)
    hlo = jax.jit(model.apply).lower(variables, images).as_text()
    assert "bf16" in hlo and "convolution" in hlo
    out = model.apply(variables, images)
    for name in ("score_map", "feature_map", "keypoints", "descriptors", "reconstruction"):
        assert out[name].dtype == jnp.float32, name
    # Same parameters as the float32 model: bfloat16 changes the compute, not the tree.
    half_variables = model.init(jax.random.key(0), images)
    assert jax.tree_util.tree_structure(half_variables) == jax.tree_util.tree_structure(variables)


def test_bfloat16_perceptual_loss_close_to_float32():
    vgg = perceptual.init_vgg16_params(jax.random.key(0), widths=(4, 8, 8, 8))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)
    full = float(perceptual.perceptual_loss(vgg, x, y, image_size=16))
    half = perceptual.perceptual_loss(vgg, x, y, image_size=16, dtype="bfloat16")
    assert half.dtype == jnp.float32
    assert float(half) == pytest.approx(full, rel=0.02)
    assert float(perceptual.perceptual_loss(vgg, x, x, image_size=16, dtype="bfloat16")) == 0.0


def test_unknown_dtype_is_refused():
    from tusk_jax import config_lib

    with pytest.raises(config_lib.ConfigError, match="model.dtype"):
        config_lib.validate_config(make_config("float16"))
