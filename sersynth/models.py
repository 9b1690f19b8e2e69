"""Flax models for [frames, n_mels] log-Mel inputs, with a flat-parameter view for trajectory matching.

Families:
  * ``convnet``: the MTT ConvNet (Cazenavette et al. 2022): ``depth`` x [3x3 conv(width), norm, ReLU,
    2x2 average pool], flatten, linear classifier.
  * ``cnn6``: four 3x3 conv layers of 64/128/256/512 channels, each followed by 2x2 max pooling.
  * ``vgg15``: five blocks of 2/2/3/3/3 3x3 convs at 64/128/256/512/512 channels, 2x2 max pool each.
  * ``resnet9``: 7x7 stride-2 conv (64), 3x3 stride-2 max pool, three residual blocks of two 3x3
    convs at 128/256/512 channels.
  The PANNs-style ones (cnn6, vgg15, resnet9) end with global max pooling and two dense layers.

``kernel`` (default 3) sets the size of every 3x3 convolution above. The paper's text gives CNN-6
3x3 kernels (1.82M parameters here for 7 classes), while its stated 4.44M parameters are close to
5x5 kernels (``kernel=5``: 4.57M here, as PANNs' CNN-6 uses); 3 is the default.
``width_mult`` scales every channel count (tiny models for tests and the CPU quick-start).
Normalisation is ``instance`` (GroupNorm, one channel per group), ``layer`` or ``none``: all are
stateless, so a model is a pure function of its parameters, which trajectory matching needs.
(PANNs use BatchNorm; its running statistics do not fit a pure inner loop, the MTT ConvNet's
instance norm does.)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

MODELS = ("convnet", "cnn6", "vgg15", "resnet9")
NORMS = ("instance", "layer", "none")


class InstanceNorm(nn.Module):
    """Per-sample, per-channel normalisation over time and frequency, with a learned scale and bias.

    Same function as ``nn.GroupNorm(group_size=1)``, written out: its second-order derivatives (the
    meta-gradient differentiates through the inner gradient) compile to less work on XLA CPU
    (benchmarks/RESULTS.md)."""
    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
        return (centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


def _norm(kind: str, dtype) -> Callable[[jax.Array], jax.Array]:
    if kind == "instance":
        return InstanceNorm(dtype)
    if kind == "layer":
        return nn.LayerNorm(dtype=dtype)
    return lambda x: x


def _ch(c: int, mult: float) -> int:
    return max(1, int(round(c * mult)))


MAX_POOLS = ("auto", "blocks", "window")
_max_pool_impl = "auto"


def set_max_pool(impl: str) -> None:
    """How the 2x2 stride-2 max pooling of cnn6 and vgg15 is computed; models traced later use it.

    Both give the same outputs, and the same gradients except where several inputs of a window tie
    for its maximum (``window`` sends the gradient to one, ``blocks`` splits it; after a ReLU the
    common tie, zeros, has no gradient either way). ``blocks``: the input, padded to even sizes with
    -inf, is reshaped into 2x2 blocks and reduced with ``max``, which differentiates to elementwise
    compares. ``window``: ``reduce_window``, differentiated by select-and-scatter, whose scatters and
    their second-order terms took 18% of the paper model's outer step on an H100. ``auto`` (default):
    ``window`` on CPU (``blocks`` was as fast there at the one size timed, compiled 20-30% slower at
    tiny sizes, and needed a third less temporary memory), ``blocks`` on GPU/TPU (the paper model's
    bfloat16 outer step on an H200: 0.995 s against 1.281 s, temporary memory 7.4 against 10.8 GB;
    benchmarks/RESULTS.md)."""
    global _max_pool_impl
    if impl not in MAX_POOLS:
        raise ValueError(f"max pool must be one of {', '.join(MAX_POOLS)}, got {impl!r}")
    _max_pool_impl = impl


def max_pool_impl() -> str:
    """The max-pool implementation models built now use (``auto`` resolved for the default backend)."""
    if _max_pool_impl != "auto":
        return _max_pool_impl
    return "window" if jax.default_backend() == "cpu" else "blocks"


DTYPES = ("float32", "bfloat16", "float16")     # what a model computes in
COMPUTE_DTYPES = ("auto", *DTYPES)              # what --compute_dtype accepts


def resolve_compute_dtype(name: str, backend: str | None = None) -> str:
    """``auto``: bfloat16 on GPU/TPU, float32 on CPU; any other name is returned as it is.

    Measured (benchmarks/RESULTS.md): on an H200 the paper model's distillation, evaluation and
    full-data reference in bfloat16 scored level with float32 on the same seeds (every setting within
    or above float32's spread) with an outer step 1.3-1.7x faster; on the 2-core CPU bfloat16 compute
    is 1.4x slower."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name != "auto":
        return name
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def _max_pool_blocks(x):
    b, h, w, c = x.shape
    if h % 2 or w % 2:                        # SAME padding of a 2x2 stride-2 window pads after, by one
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    return jnp.max(x.reshape(b, h2, 2, w2, 2, c), axis=(2, 4))


def _max_pool(x, k=2, s=2):
    if k == 2 and s == 2 and max_pool_impl() == "blocks":
        return _max_pool_blocks(x)
    return nn.max_pool(x, window_shape=(k, k), strides=(s, s), padding="SAME")


class ConvNet(nn.Module):
    n_classes: int
    width: int = 128
    depth: int = 3
    norm: str = "instance"
    dtype: jnp.dtype = jnp.float32
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        x = x[..., None].astype(self.dtype)
        for _ in range(self.depth):
            x = nn.Conv(self.width, (self.kernel, self.kernel), padding="SAME", dtype=self.dtype)(x)
            x = nn.relu(_norm(self.norm, self.dtype)(x))
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        self.sow("intermediates", "embedding", x)
        return nn.Dense(self.n_classes, dtype=self.dtype)(x).astype(jnp.float32)


class _Head(nn.Module):
    """Global max pooling over time and frequency, then two dense layers."""
    n_classes: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = jnp.max(x, axis=(1, 2))
        self.sow("intermediates", "embedding", x)
        x = nn.relu(nn.Dense(x.shape[-1], dtype=self.dtype)(x))
        return nn.Dense(self.n_classes, dtype=self.dtype)(x).astype(jnp.float32)


class _ConvBlock(nn.Module):
    channels: int
    n_convs: int
    norm: str
    dtype: jnp.dtype
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        for _ in range(self.n_convs):
            x = nn.Conv(self.channels, (self.kernel, self.kernel), padding="SAME", dtype=self.dtype)(x)
            x = nn.relu(_norm(self.norm, self.dtype)(x))
        return _max_pool(x)


class PlainCNN(nn.Module):
    """CNN-6 (one conv per block) and VGG-15 (2/2/3/3/3 convs per block)."""
    n_classes: int
    channels: tuple[int, ...]
    convs: tuple[int, ...]
    norm: str = "instance"
    dtype: jnp.dtype = jnp.float32
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        x = x[..., None].astype(self.dtype)
        for c, n in zip(self.channels, self.convs):
            x = _ConvBlock(c, n, self.norm, self.dtype, self.kernel)(x)
        return _Head(self.n_classes, self.dtype)(x)


class _Residual(nn.Module):
    channels: int
    norm: str
    dtype: jnp.dtype
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        k = (self.kernel, self.kernel)
        y = nn.Conv(self.channels, k, strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
        y = nn.relu(_norm(self.norm, self.dtype)(y))
        y = nn.Conv(self.channels, k, padding="SAME", dtype=self.dtype)(y)
        y = _norm(self.norm, self.dtype)(y)
        shortcut = nn.Conv(self.channels, (1, 1), strides=(2, 2), dtype=self.dtype)(x)
        return nn.relu(y + shortcut)


class ResNet9(nn.Module):
    n_classes: int
    width_mult: float = 1.0
    norm: str = "instance"
    dtype: jnp.dtype = jnp.float32
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        x = x[..., None].astype(self.dtype)
        x = nn.Conv(_ch(64, self.width_mult), (7, 7), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
        x = nn.relu(_norm(self.norm, self.dtype)(x))
        x = _max_pool(x, 3, 2)
        for c in (128, 256, 512):
            x = _Residual(_ch(c, self.width_mult), self.norm, self.dtype, self.kernel)(x)
        return _Head(self.n_classes, self.dtype)(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored with expert trajectories and distilled sets."""
    name: str = "convnet"
    n_classes: int = 7
    input_shape: tuple[int, int] = (373, 64)     # [frames, n_mels]
    width: int = 128                              # convnet channels
    depth: int = 3                                # convnet conv layers
    width_mult: float = 1.0                       # cnn6 / vgg15 / resnet9 channel scale
    norm: str = "instance"
    compute_dtype: str = "float32"                # float32 | bfloat16 (parameters stay float32)
    kernel: int = 3                               # size of the (default 3x3) convolutions

    def validate(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {', '.join(MODELS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if self.n_classes < 2 or self.width < 1 or self.depth < 1 or self.width_mult <= 0:
            raise ValueError("need n_classes >= 2, width >= 1, depth >= 1 and width_mult > 0")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"--kernel_size must be an odd number >= 1, got {self.kernel}")

    def build(self) -> nn.Module:
        self.validate()
        dtype = jnp.dtype(self.compute_dtype)
        if self.name == "convnet":
            return ConvNet(self.n_classes, self.width, self.depth, self.norm, dtype, self.kernel)
        if self.name == "cnn6":
            return PlainCNN(self.n_classes, tuple(_ch(c, self.width_mult) for c in (64, 128, 256, 512)),
                            (1, 1, 1, 1), self.norm, dtype, self.kernel)
        if self.name == "vgg15":
            return PlainCNN(self.n_classes, tuple(_ch(c, self.width_mult) for c in (64, 128, 256, 512, 512)),
                            (2, 2, 3, 3, 3), self.norm, dtype, self.kernel)
        return ResNet9(self.n_classes, self.width_mult, self.norm, dtype, self.kernel)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class FlatModel:
    """A model seen as ``apply(flat_params [P], x [B, frames, n_mels]) -> logits [B, n_classes]``."""
    spec: ModelSpec
    n_params: int
    unravel: Callable[[jax.Array], dict]
    module: nn.Module

    def apply(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        return self.module.apply({"params": self.unravel(flat)}, x)

    def embed(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        """``[B, D]`` float32 features the classifier head reads (ConvNet: the flattened feature maps;
        CNN-6 / VGG-15 / ResNet-9: the globally max-pooled channels)."""
        _, state = self.module.apply({"params": self.unravel(flat)}, x, mutable=["intermediates"])
        leaves = jax.tree.leaves(state["intermediates"])
        return leaves[0].astype(jnp.float32)

    def init(self, key: jax.Array) -> jax.Array:
        """A fresh float32 parameter vector ``[P]``."""
        dummy = jnp.zeros((1, *self.spec.input_shape), jnp.float32)
        return ravel_pytree(self.module.init(key, dummy)["params"])[0].astype(jnp.float32)

    @functools.cached_property
    def _jitted_init(self) -> Callable[[jax.Array], jax.Array]:
        return jax.jit(self.init)

    def init_many(self, keys: jax.Array) -> jax.Array:
        """``[len(keys), P]`` parameter vectors, the same as :meth:`init` of each key. One compiled
        init called per key: an eager ``vmap`` of Flax's init took 12.6 s for four quick-start
        ConvNets on XLA CPU (every op of the dummy forward dispatched on its own), a compiled
        ``vmap`` 10.7 s (mostly compiling), this 2.9 s with its compilation, and 2 ms once compiled."""
        return jnp.stack([self._jitted_init(k) for k in keys])


def flat_model(spec: ModelSpec) -> FlatModel:
    module = spec.build()
    dummy = jnp.zeros((1, *spec.input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), dummy)["params"])
    template = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    flat, unravel = ravel_pytree(template)
    return FlatModel(spec, int(flat.size), unravel, module)
