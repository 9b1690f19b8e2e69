"""Models: shapes, dtypes and the flat-parameter view."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sersynth import models
from sersynth.models import ModelSpec, flat_model

SHAPE = (24, 16)


@pytest.mark.parametrize("name,kw", [("convnet", dict(width=8, depth=2)), ("cnn6", dict(width_mult=0.0625)),
                                     ("vgg15", dict(width_mult=0.0625)), ("resnet9", dict(width_mult=0.0625))])
def test_models_shapes_and_flat_view(name, kw):
    fm = flat_model(ModelSpec(name=name, n_classes=5, input_shape=SHAPE, **kw))
    flat = fm.init(jax.random.key(0))
    assert flat.shape == (fm.n_params,) and flat.dtype == jnp.float32
    x = jax.random.normal(jax.random.key(1), (3, *SHAPE))
    logits = fm.apply(flat, x)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    # the flat view is the module's own parameter tree
    tree = fm.module.init(jax.random.key(0), x[:1])["params"]
    np.testing.assert_allclose(ravel_pytree(tree)[0], flat)
    np.testing.assert_allclose(fm.module.apply({"params": tree}, x), logits, rtol=1e-5, atol=1e-5)
    # several at once (compiled): each key's own init, in key order
    keys = jax.random.split(jax.random.key(2), 3)
    np.testing.assert_array_equal(fm.init_many(keys), np.stack([fm.init(k) for k in keys]))


def test_paper_models_channel_counts():
    """Full-width paper models: CNN-6 64..512 channels, VGG-15 13 convs, ResNet-9 64 stem."""
    cnn6 = flat_model(ModelSpec(name="cnn6", n_classes=7, input_shape=SHAPE))
    vgg = flat_model(ModelSpec(name="vgg15", n_classes=7, input_shape=SHAPE))
    convs = [k for k in jax.tree_util.tree_flatten_with_path(vgg.unravel(jnp.zeros(vgg.n_params)))[0]
             if "Conv" in jax.tree_util.keystr(k[0]) and k[0][-1].key == "kernel"]
    assert len(convs) == 13
    # CNN-6 conv weights: 9*(1*64 + 64*128 + 128*256 + 256*512), two dense layers 512x512 and 512x7
    expected = 9 * (64 + 64 * 128 + 128 * 256 + 256 * 512) + (64 + 128 + 256 + 512) + 512 * 512 + 512 + 512 * 7 + 7
    expected += 2 * (64 + 128 + 256 + 512)   # instance-norm scale and bias
    assert cnn6.n_params == expected


def test_bfloat16_compute_keeps_float32_params_and_logits():
    fm = flat_model(ModelSpec(name="convnet", width=8, depth=2, n_classes=3, input_shape=SHAPE,
                              compute_dtype="bfloat16"))
    flat = fm.init(jax.random.key(0))
    out = fm.apply(flat, jnp.ones((2, *SHAPE)))
    assert flat.dtype == jnp.float32 and out.dtype == jnp.float32


def test_bad_spec():
    with pytest.raises(ValueError, match="unknown model"):
        ModelSpec(name="transformer").validate()
    with pytest.raises(ValueError, match="unknown norm"):
        ModelSpec(norm="batch").validate()


def test_instance_norm_matches_flax_groupnorm_per_channel():
    import flax.linen as nn

    from sersynth.models import InstanceNorm

    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 4)) * 3 + 1
    ours = InstanceNorm()
    ref = nn.GroupNorm(num_groups=None, group_size=1)
    p = ours.init(jax.random.key(1), x)
    np.testing.assert_allclose(ours.apply(p, x), ref.apply(ref.init(jax.random.key(1), x), x), atol=1e-4)
    # learned scale and bias act per channel
    p2 = {"params": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.ones(4)}}
    out = ours.apply(p2, x)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), np.ones((2, 4)), atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), np.tile(np.arange(1.0, 5.0), (2, 1)), rtol=1e-3)


def test_kernel_size_option():
    three = flat_model(ModelSpec(name="cnn6", input_shape=(373, 64)))
    five = flat_model(ModelSpec(name="cnn6", input_shape=(373, 64), kernel=5))
    assert three.n_params == 1_817_991 and five.n_params == 4_571_527
    with pytest.raises(ValueError, match="--kernel_size must be an odd number"):
        ModelSpec(kernel=4).validate()


@pytest.fixture
def max_pool_restored():
    yield
    models.set_max_pool("auto")


def test_max_pool_blocks_match_reduce_window_without_scatter(max_pool_restored, monkeypatch):
    """cnn6 at an odd input size: same logits, gradients and the meta-gradient's second-order terms
    with either implementation; only ``window`` differentiates through select-and-scatter."""
    fm_spec = ModelSpec(name="cnn6", width_mult=0.0625, n_classes=3, input_shape=(37, 21))
    x = jax.random.normal(jax.random.key(0), (4, 37, 21))
    y = jax.nn.one_hot(jnp.array([0, 1, 2, 1]), 3)

    def outputs(impl):
        models.set_max_pool(impl)
        fm = flat_model(fm_spec)
        theta = fm.init(jax.random.key(1))
        loss = lambda th, xb: -jnp.mean(jnp.sum(y * jax.nn.log_softmax(fm.apply(th, xb)), -1))
        meta = lambda xb: jnp.sum(jnp.square(theta - 0.1 * jax.grad(loss)(theta, xb)))   # d/dx through a step
        hlo = jax.jit(jax.grad(meta)).lower(x).as_text()
        return fm.apply(theta, x), jax.grad(loss)(theta, x), jax.grad(meta)(x), hlo

    blocks, window = outputs("blocks"), outputs("window")
    for a, b in zip(blocks[:3], window[:3]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert "scatter" in window[3] and "scatter" not in blocks[3]
    models.set_max_pool("auto")                       # auto: window on CPU, blocks on accelerators
    for backend, impl in (("cpu", "window"), ("gpu", "blocks"), ("tpu", "blocks")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert models.max_pool_impl() == impl
    with pytest.raises(ValueError, match="max pool must be one of"):
        models.set_max_pool("avg")


def test_compute_dtype_auto_is_bfloat16_on_accelerators_only():
    for backend, dtype in (("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")):
        assert models.resolve_compute_dtype("auto", backend) == dtype
        assert models.resolve_compute_dtype("float32", backend) == "float32"   # a given dtype is kept
    assert models.resolve_compute_dtype("auto") == "float32"                  # this machine: CPU
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        models.resolve_compute_dtype("fp8")
