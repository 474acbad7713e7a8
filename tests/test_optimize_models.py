"""jax_brgemm.optimize on models nobody here wrote: stock Flax NNX and Linen, Equinox,
Haiku and Keras 3, each in its library's canonical training step with one added call.
Forward and gradients equal the unrewritten function within float32 tolerance, and the
explanation says how many ops went to the kernel."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import jax_brgemm as jb

RTOL = 3e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_trees_close(got, want, rtol=RTOL):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel(g, w) < rtol


def images(n=4, size=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, size, size, channels)), jnp.float32)


# ------------------------------------------------------------------ Flax NNX


class Block(nnx.Module):
    """A ResNet basic block with BatchNorm, as users write it with stock modules."""

    def __init__(self, channels, rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(channels, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class ResNetish(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 16, (3, 3), strides=2, rngs=rngs)
        self.block = Block(16, rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = self.block(nnx.relu(self.stem(x)))
        return self.head(x.mean(axis=(1, 2)))


def nnx_step(model, optimizer, x, y, loss_wrapper):
    def loss_fn(model):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_wrapper(loss_fn))(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_resnet_block_training_step():
    x, y = images(), jnp.arange(4) % 10
    models = [ResNetish(nnx.Rngs(0)) for _ in range(2)]
    optimizers = [nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param) for m in models]
    step = nnx.jit(nnx_step, static_argnums=4)
    for _ in range(2):
        losses = [step(m, o, x, y, wrap) for m, o, wrap in
                  zip(models, optimizers, (lambda f: f, lambda f: jb.optimize(f, min_macs=0)))]
        assert rel(losses[1], losses[0]) < RTOL
    # Parameters and BatchNorm's running statistics (written back by optimize) agree.
    assert_trees_close(nnx.state(models[1]), nnx.state(models[0]), rtol=1e-4)
    e = jb.optimize(lambda m: m(x), min_macs=0).explain(models[0])
    assert len(e.served) == 6  # 3 convolutions, the head and both BatchNorms
    bns = [d for d in e.served if d.primitive == "batch_norm"]
    assert [d.fused for d in bns] == [("relu",), ("residual", "relu")]


def test_nnx_eval_mode_folds_batchnorm():
    model = ResNetish(nnx.Rngs(1))
    x = images(seed=1)
    nnx.jit(lambda m, x: m(x))(model, x)  # one training-mode call moves the statistics
    model.eval()
    fwd = lambda m, x: m(x)  # noqa: E731
    assert_trees_close(jb.optimize(fwd, min_macs=0)(model, x), fwd(model, x))
    e = jb.explain(jb.optimize(fwd, min_macs=0), model, x)
    # bn1 and its relu fold into conv1; bn2 into conv2 (the residual add stops the chain).
    assert [d.fused for d in e.served[1:3]] == [("bias", "scale", "bias", "relu"), ("bias", "scale", "bias")]


class Decoder(nnx.Module):
    """A ConvTranspose decoder, the convolutions XLA is slowest at on a CPU."""

    def __init__(self, rngs):
        self.up1 = nnx.ConvTranspose(16, 16, (3, 3), strides=(2, 2), rngs=rngs)
        self.up2 = nnx.ConvTranspose(16, 8, (4, 4), strides=(2, 2), padding="VALID", rngs=rngs)
        self.out = nnx.Conv(8, 3, (3, 3), rngs=rngs)

    def __call__(self, z):
        return self.out(nnx.relu(self.up2(nnx.relu(self.up1(z)))))


def test_nnx_conv_transpose_decoder_gradients():
    model, z = Decoder(nnx.Rngs(2)), images(2, 6, 16, seed=2)
    loss = lambda m, z: jnp.mean(m(z) ** 2)  # noqa: E731
    want = nnx.grad(loss)(model, z)
    got = nnx.jit(nnx.grad(jb.optimize(loss, min_macs=0)))(model, z)
    assert_trees_close(got, want, rtol=1e-4)
    e = jb.explain(jb.optimize(loss, min_macs=0), model, z)
    assert [d.op for d in e.served] == ["nn.conv_transpose", "nn.conv_transpose", "nn.conv2d"]


def test_nnx_mlp():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.gelu(self.l1(x)))

    model = MLP(nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 32)), jnp.float32)
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    assert_trees_close(nnx.grad(jb.optimize(loss, min_macs=0))(model), nnx.grad(loss)(model), rtol=1e-4)
    assert len(jb.explain(jb.optimize(loss, min_macs=0), model).served) == 2


# ------------------------------------------------------------------ Flax Linen


class LinenCNN(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool):
        x = linen.Conv(16, (3, 3), use_bias=False)(x)  # a bias before BatchNorm has no gradient
        x = linen.BatchNorm(use_running_average=not train)(x)
        x = linen.relu(x)
        x = linen.Conv(16, (3, 3), strides=2, feature_group_count=4)(x)
        return linen.Dense(10)(x.reshape(x.shape[0], -1))


def test_linen_training_gradients():
    model, x, y = LinenCNN(), images(seed=4), jnp.arange(4) % 10
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params, x, y):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    want = jax.value_and_grad(loss)(variables["params"], x, y)
    got = jax.jit(jax.value_and_grad(jb.optimize(loss, min_macs=0)))(variables["params"], x, y)
    assert_trees_close(got, want, rtol=1e-4)
    served = jb.explain(jb.optimize(loss, min_macs=0), variables["params"], x, y).served
    assert [d.op for d in served] == ["nn.conv2d", "nn.batch_norm", "nn.conv2d", "nn.dense"]
    assert served[1].fused == ("relu",)


# ------------------------------------------------------------------ Equinox


def test_equinox_cnn_filter_value_and_grad():
    eqx = pytest.importorskip("equinox")  # a test extra

    class CNN(eqx.Module):
        conv1: eqx.nn.Conv2d
        conv2: eqx.nn.Conv2d
        linear: eqx.nn.Linear
        act: object = jax.nn.relu  # a function leaf: static

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.conv1 = eqx.nn.Conv2d(3, 8, 3, padding=1, key=k1)
            self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, key=k2)
            self.linear = eqx.nn.Linear(16 * 7 * 7, 10, key=k3)

        def __call__(self, x):  # one CHW image, as Equinox layers take
            x = self.act(self.conv2(self.act(self.conv1(x))))
            return self.linear(x.reshape(-1))

    model = CNN(jax.random.key(1))
    x = jnp.transpose(images(seed=5), (0, 3, 1, 2))
    y = jnp.arange(4) % 10

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    want = eqx.filter_value_and_grad(loss)(model, x, y)
    got = eqx.filter_jit(eqx.filter_value_and_grad(jb.optimize(loss, min_macs=0)))(model, x, y)
    assert_trees_close(got, want, rtol=1e-4)
    assert len(jb.explain(jb.optimize(loss, min_macs=0), model, x, y).served) == 3


# ------------------------------------------------------------------ Haiku


def test_haiku_mlp_and_conv_grad():
    hk = pytest.importorskip("haiku")  # a test extra

    def forward(x):
        x = hk.Conv2D(8, 3)(x)
        x = jax.nn.relu(x)
        return hk.nets.MLP([32, 10])(x.reshape(x.shape[0], -1))

    model = hk.without_apply_rng(hk.transform(forward))
    x, y = images(seed=6), jnp.arange(4) % 10
    params = model.init(jax.random.key(2), x)

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    assert_trees_close(jax.grad(jb.optimize(loss, min_macs=0))(params, x, y), jax.grad(loss)(params, x, y),
                       rtol=1e-4)
    assert len(jb.explain(jb.optimize(loss, min_macs=0), params, x, y).served) == 3


# ------------------------------------------------------------------ Keras 3


def test_keras_stateless_call():
    keras = pytest.importorskip("keras")  # a test extra, on the JAX backend
    assert keras.backend.backend() == "jax"
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Conv2D(8, 3, strides=2, padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    x = np.asarray(images(seed=7))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, non_trainable, x):
        y, _ = model.stateless_call(trainable, non_trainable, x)
        return jnp.sum(y ** 2)

    want = jax.value_and_grad(loss)(trainable, non_trainable, x)
    got = jax.jit(jax.value_and_grad(jb.optimize(loss, min_macs=0)))(trainable, non_trainable, x)
    assert_trees_close(got, want, rtol=1e-4)
    out, _ = jb.optimize(model.stateless_call, min_macs=0)(trainable, non_trainable, x)
    assert rel(out, model(x)) < RTOL
    assert len(jb.explain(jb.optimize(loss, min_macs=0), trainable, non_trainable, x).served) == 3
