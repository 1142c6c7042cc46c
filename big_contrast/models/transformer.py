"""Transformer pieces shared by the image and the text tower.

Every parameter carries logical axis names in its ``out_sharding`` metadata
(with ``eager_sharding=False``: the names are logical, ``big_contrast.sharding``
maps them to mesh axes); the main activations are constrained by logical name
with ``sharding.constrain`` (a no-op outside ``jax.set_mesh``).

Layouts follow big_vision's ViT encoder: pre-LayerNorm blocks, multi-head
attention with q/k/v kernels ``[D, H, D/H]`` and an output kernel
``[H, D/H, D]``, a GELU MLP, and a final LayerNorm.

Options that released checkpoints need (see ``big_contrast/interop``): the MLP
activation ``act`` (``ACTIVATIONS``: big_vision / SigLIP use tanh-GELU, OpenAI
CLIP QuickGELU, LAION and open_clip's SigLIP text towers exact GELU) and the
LayerNorm epsilon ``norm_eps`` (1e-6 in big_vision / SigLIP, 1e-5 in CLIP).

Rotary position embeddings (``models/rope.py``, the image tower's ``rope='2d'``): the
encoder takes an optional ``rotary`` (cos, sin) pair [B|1, L, K/2] and hands it through every
block to self-attention, which rotates q and k by it before the logits; without it nothing
changes.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast.errors import ConfigError
from big_contrast.models.rope import apply_rotary
from big_contrast.sharding import constrain

Dtype = Any

# Logical names of the residual stream [B, L, D] and its relatives.
ACT_BLD = ("batch", "act_seq", "act_embed")
ACT_BLF = ("batch", "act_seq", "act_mlp")
ACT_BLHK = ("batch", "act_seq", "act_heads", "act_kv")

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_xavier = nnx.initializers.xavier_uniform()

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # big_vision, HF "gelu_pytorch_tanh"
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU (torch nn.GELU)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


def logical(*axes: str | None) -> dict:
    """Variable metadata naming the logical axes of a parameter."""
    return {"out_sharding": axes, "eager_sharding": False}


def check_choice(what: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{what}={value!r} is unknown; use one of {tuple(allowed)}.")


def check_heads(width: int, num_heads: int) -> None:
    if num_heads < 1 or width % num_heads:
        raise ConfigError(f"width {width} is not divisible by num_heads {num_heads}; "
                          "pick a number of heads that divides the width.")


def layer_norm(width: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
               eps: float = 1e-6) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                         scale_metadata=logical("embed"), bias_metadata=logical("embed"),
                         rngs=rngs)


class Mlp(nnx.Module):
    """Dense(D->F), activation ``act`` (``ACTIVATIONS``), Dense(F->D); hidden units tensor-parallel."""

    def __init__(self, width: int, mlp_dim: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs, act: str = "gelu_tanh"):
        check_choice("act", act, ACTIVATIONS)
        self.act = act
        common = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_xavier,
                      rngs=rngs)  # zero biases
        self.fc1 = nnx.Linear(width, mlp_dim, kernel_metadata=logical("embed", "mlp"),
                              bias_metadata=logical("mlp"), **common)
        self.fc2 = nnx.Linear(mlp_dim, width, kernel_metadata=logical("mlp", "embed"),
                              bias_metadata=logical("embed"), **common)

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        h_blf = constrain(ACTIVATIONS[self.act](self.fc1(x_bld)), ACT_BLF)
        return self.fc2(h_blf)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
_attention_impl = contextvars.ContextVar("attention_impl", default="auto")


@contextlib.contextmanager
def attention_implementation(name: str):
    """Selects the attention kernel for models *traced* inside the block (benchmarks, tests).

    'auto' (the default): cuDNN flash attention on a GPU for bf16 / f16 inputs, XLA's
    ``jax.nn.dot_product_attention`` otherwise; 'xla' / 'cudnn' force one of those; 'einsum'
    is the materialised float32 reference (`einsum_attention`). A function already jitted keeps
    the kernel it was traced with.
    """
    check_choice("attention implementation", name, ATTENTION_IMPLS)
    token = _attention_impl.set(name)
    try:
        yield
    finally:
        _attention_impl.reset(token)


def dot_product_attention(q_bqhk, k_bkhk, v_bkhk, mask=None) -> jax.Array:
    """Softmax attention, logits and softmax in float32; ``mask`` [B|1, 1|H, Q, K] is True where
    attending is allowed.

    Goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention on a GPU for bf16 /
    f16, which never writes the logits to memory; XLA's implementation elsewhere) unless
    `attention_implementation('einsum')` asks for the reference. A query with no allowed key
    yields finite garbage instead of NaN (masked logits get a large negative finite value);
    such queries are padding and are never pooled.
    """
    impl = _attention_impl.get()
    if impl == "einsum":
        return einsum_attention(q_bqhk, k_bkhk, v_bkhk, mask)
    if impl != "auto":
        return jax.nn.dot_product_attention(q_bqhk, k_bkhk, v_bkhk, mask=mask, implementation=impl)
    if q_bqhk.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu":
        try:  # cuDNN refuses some shapes / masks while tracing: XLA's kernel then
            return jax.nn.dot_product_attention(q_bqhk, k_bkhk, v_bkhk, mask=mask,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q_bqhk, k_bkhk, v_bkhk, mask=mask, implementation="xla")


def einsum_attention(q_bqhk, k_bkhk, v_bkhk, mask=None) -> jax.Array:
    """The materialised reference: full float32 logits [B, H, Q, K], masked with the most
    negative finite float, softmax, weights back in the value dtype."""
    q_bqhk = q_bqhk * (q_bqhk.shape[-1] ** -0.5)
    logits_bhqk = jnp.einsum("bqhk,bvhk->bhqv", q_bqhk, k_bkhk).astype(jnp.float32)
    if mask is not None:
        logits_bhqk = jnp.where(mask, logits_bhqk, jnp.finfo(jnp.float32).min)
    weights_bhqk = jax.nn.softmax(logits_bhqk, axis=-1).astype(v_bkhk.dtype)
    return jnp.einsum("bhqv,bvhk->bqhk", weights_bhqk, v_bkhk)


class Attention(nnx.Module):
    """Multi-head attention; heads are tensor-parallel, the model width FSDP-sharded."""

    def __init__(self, width: int, num_heads: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        check_heads(width, num_heads)
        head_dim = width // num_heads
        # Glorot fans over the flattened [D, H*K] / [H*K, D] matrices, as big_vision's DenseGeneral.
        in_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0,
                                                    out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1),
                                                     out_axis=2)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def projection(init):
            return nnx.Einsum("bld,dhk->blhk", (width, num_heads, head_dim), (num_heads, head_dim),
                              kernel_init=init, kernel_metadata=logical("embed", "heads", "kv"),
                              bias_metadata=logical("heads", "kv"), **common)

        self.query = projection(in_init)
        self.key = projection(in_init)
        self.value = projection(in_init)
        self.out = nnx.Einsum("blhk,hkd->bld", (num_heads, head_dim, width), (width,),
                              kernel_init=out_init, kernel_metadata=logical("heads", "kv", "embed"),
                              bias_metadata=logical("embed"), **common)

    def __call__(self, x_q, x_kv=None, mask=None, rotary=None) -> jax.Array:
        """``rotary``: the (cos, sin) pair of ``rope.rotary_table`` for the tokens of ``x_q``,
        applied to q and k (self-attention only: queries and keys are the same tokens)."""
        x_kv = x_q if x_kv is None else x_kv
        q, k, v = (constrain(proj(x), ACT_BLHK)
                   for proj, x in ((self.query, x_q), (self.key, x_kv), (self.value, x_kv)))
        if rotary is not None:
            q, k = (constrain(apply_rotary(t, rotary), ACT_BLHK) for t in (q, k))
        return self.out(constrain(dot_product_attention(q, k, v, mask), ACT_BLHK))


class Block(nnx.Module):
    """Pre-LN residual block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs, act: str = "gelu_tanh",
                 norm_eps: float = 1e-6):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(width, eps=norm_eps, **common)
        self.attention = Attention(width, num_heads, **common)
        self.norm2 = layer_norm(width, eps=norm_eps, **common)
        self.mlp = Mlp(width, mlp_dim, act=act, **common)

    def __call__(self, x_bld, mask=None, rotary=None) -> jax.Array:
        x_bld = constrain(x_bld + self.attention(self.norm1(x_bld), mask=mask, rotary=rotary),
                          ACT_BLD)
        return constrain(x_bld + self.mlp(self.norm2(x_bld)), ACT_BLD)


def _call_block(block: Block, x_bld, mask, rotary):
    return block(x_bld, mask, rotary)


class Encoder(nnx.Module):
    """``depth`` blocks and a final LayerNorm.

    ``scan=True`` stacks the blocks' parameters on a leading 'layers' axis and
    runs them with ``nnx.scan`` (one compiled block instead of ``depth``);
    ``remat`` names a policy in ``REMAT_POLICIES`` applied to every block.
    ``uses_rotary=True`` (an image tower with ``rope='2d'``): every call must pass the
    ``rotary`` table of its tokens, so a caller that does not know about it (NaFlex) fails
    with a sentence instead of running without positions.
    """

    def __init__(self, *, width: int, depth: int, mlp_dim: int, num_heads: int, dtype: Dtype,
                 param_dtype: Dtype, remat: str = "none", scan: bool = False, rngs: nnx.Rngs,
                 act: str = "gelu_tanh", norm_eps: float = 1e-6, uses_rotary: bool = False):
        check_choice("remat", remat, REMAT_POLICIES)
        check_heads(width, num_heads)
        if depth < 1:
            raise ConfigError(f"depth {depth} must be at least 1.")

        def make_block(rngs):
            return Block(width, mlp_dim, num_heads, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs, act=act, norm_eps=norm_eps)

        self.remat = remat
        self.scan = scan
        self.uses_rotary = uses_rotary
        if scan:
            self.blocks = _stacked_blocks(make_block, depth, rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.norm = layer_norm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs, eps=norm_eps)

    def __call__(self, x_bld, mask=None, rotary=None) -> jax.Array:
        self._check_rotary(rotary)
        apply = _call_block
        if self.remat != "none":
            apply = nnx.remat(_call_block, policy=REMAT_POLICIES[self.remat],
                              prevent_cse=not self.scan)
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def run_layer(x_bld, block):
                return apply(block, x_bld, mask, rotary)

            x_bld = run_layer(x_bld, self.blocks)
        else:
            for block in self.blocks:
                x_bld = apply(block, x_bld, mask, rotary)
        return self.norm(x_bld)

    def _check_rotary(self, rotary) -> None:
        if self.uses_rotary and rotary is None:
            raise NotImplementedError(
                "this encoder was built with rope='2d' and needs its tokens' rotary table, which "
                "this caller does not pass (NaFlex with 2D RoPE is not built): use rope='none'.")
        if not self.uses_rotary and rotary is not None:
            raise ConfigError("a rotary table was passed to an encoder built without RoPE; build "
                              "the tower with rope='2d'.")


def _stacked_blocks(make_block, depth: int, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make_block(rngs)

    return create(rngs)


class MAPHead(nnx.Module):
    """Multihead attention pooling (big_vision): a learned probe attends over the tokens."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs, act: str = "gelu_tanh",
                 norm_eps: float = 1e-6):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.probe = nnx.Param(_xavier(rngs.params(), (1, 1, width), param_dtype),
                               **logical(None, None, "embed"))
        self.attention = Attention(width, num_heads, **common)
        self.norm = layer_norm(width, eps=norm_eps, **common)
        self.mlp = Mlp(width, mlp_dim, act=act, **common)
        self.dtype = dtype

    def __call__(self, x_bld, valid_bl=None) -> jax.Array:
        """Pools [B, L, D] to [B, D]; ``valid_bl`` (bool) masks out padding tokens."""
        probe = jnp.broadcast_to(self.probe.get_value().astype(x_bld.dtype),
                                 (x_bld.shape[0], 1, x_bld.shape[-1]))
        mask = None if valid_bl is None else valid_bl[:, None, None, :]
        x = self.attention(probe, x_bld, mask=mask)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [h*w, width] (MoCo v3 / big_vision)."""
    if width % 4:
        raise ConfigError(f"posemb='sincos2d' needs a width divisible by 4, got {width}.")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / max(width // 4 - 1, 1)
    omega = 1.0 / (temperature ** omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)
