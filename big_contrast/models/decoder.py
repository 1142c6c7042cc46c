"""Captioning decoder on the image tower's patch tokens (LocCa / CapPa, SigLIP 2's decoder), Flax NNX.

SigLIP 2 (Tschannen et al., 2025) adds a LocCa-style decoder to the sigmoid loss: a transformer
decoder cross-attends to the image tower's un-pooled patch tokens and predicts the caption
(and, where boxes exist, referring expressions and grounded captions — those are just other
target token sequences built by the data pipeline). Each block is pre-LayerNorm:

    x = x + SelfAttn(LN(x), causal mask)
    x = x + CrossAttn(LN(x), patch tokens)
    x = x + MLP(LN(x))

then a final LayerNorm and a vocabulary projection initialised to zero (CapPa), so training
starts from the uniform distribution over tokens.

Two ways to decode one example, chosen per row by the caller (``parallel_b``):

* autoregressive (teacher forcing): the input is the target shifted right by one with
  ``bos_id`` first, under a causal mask: position t sees targets ``< t`` only;
* parallel prediction (CapPa, Tschannen et al. 2023): every input token is the mask token
  (id ``vocab_size``, one extra embedding row) and attention is bidirectional, so the decoder
  must predict every token from the image alone. CapPa decodes 75 % of the examples this way.

The caller draws ``parallel_b`` from per-example keys (step, global row index), as patch dropout
does, so both passes of gradient caching and a resumed run decode each row the same way.

`caption_loss_sums` returns per-example sums of token cross-entropies and token counts, padding
masked out: the loss is a mean over the *global* batch's tokens, and gradient caching sums
micro-batches' sums before dividing once (the terms are per example, unlike the contrastive
loss). `greedy_captions` decodes for evaluation by recomputing the prefix at each position (no
KV cache: captions are short and this runs only in evaluation).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from big_contrast.errors import ConfigError
from big_contrast.models import transformer as tfm
from big_contrast.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything that shapes the decoder; passed whole to `Decoder`."""

    vocab_size: int
    max_len: int
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 1024
    encoder_width: int | None = None  # the image tower's width; a projection when it differs
    parallel_fraction: float = 0.0  # CapPa's masked_pred_prob: rows decoded in parallel (75 % in CapPa)
    bos_id: int = 0  # the first input of teacher forcing (big_vision shifts right with 0)
    pad_id: int = 0  # targets equal to it are padding: masked out of the loss
    eos_id: int | None = 1  # greedy decoding stops a row at it
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "width", "depth", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config.decoder.{name}={value!r} must be a positive integer.")
        tfm.check_heads(self.width, self.num_heads)
        tfm.check_choice("decoder act", self.act, tfm.ACTIVATIONS)
        if not 0.0 <= self.parallel_fraction <= 1.0:
            raise ConfigError(f"config.decoder.parallel_fraction={self.parallel_fraction} must be in [0, 1]: "
                              "it is the fraction of examples decoded by parallel prediction (CapPa uses 0.75).")
        for name in ("bos_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"config.decoder.{name}={getattr(self, name)} is not a token id of the "
                                  f"vocabulary of {self.vocab_size}.")

    @property
    def mask_id(self) -> int:
        """The input id of parallel prediction: one row past the vocabulary."""
        return self.vocab_size


class DecoderBlock(nnx.Module):
    """Pre-LN: causal self-attention, cross-attention to the patch tokens, MLP; each residual."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        common = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        norm = dict(eps=config.norm_eps, **common)
        self.norm1 = tfm.layer_norm(config.width, **norm)
        self.self_attention = tfm.Attention(config.width, config.num_heads, **common)
        self.norm2 = tfm.layer_norm(config.width, **norm)
        self.cross_attention = tfm.Attention(config.width, config.num_heads, **common)
        self.norm3 = tfm.layer_norm(config.width, **norm)
        self.mlp = tfm.Mlp(config.width, config.mlp_dim, act=config.act, **common)

    def __call__(self, x_bld, encoded_bpd, self_mask, cross_mask) -> jax.Array:
        x_bld = constrain(x_bld + self.self_attention(self.norm1(x_bld), mask=self_mask), tfm.ACT_BLD)
        x_bld = constrain(x_bld + self.cross_attention(self.norm2(x_bld), encoded_bpd, mask=cross_mask),
                          tfm.ACT_BLD)
        return constrain(x_bld + self.mlp(self.norm3(x_bld)), tfm.ACT_BLD)


class Decoder(nnx.Module):

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # One extra row: the mask token of parallel prediction.
        self.embedding = nnx.Embed(config.vocab_size + 1, config.width,
                                   embedding_init=nnx.initializers.normal(config.width ** -0.5),
                                   embedding_metadata=tfm.logical("vocab", "embed"), **common)
        self.posemb = nnx.Param(nnx.initializers.normal(config.width ** -0.5)(
            rngs.params(), (1, config.max_len, config.width), param_dtype), **tfm.logical(None, None, "embed"))
        encoder_width = config.encoder_width or config.width
        self.encoder_projection = (
            nnx.Linear(encoder_width, config.width, kernel_metadata=tfm.logical("embed", "mlp"),
                       bias_metadata=tfm.logical("mlp"), **common)
            if encoder_width != config.width else nnx.data(None))
        self.blocks = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = tfm.layer_norm(config.width, eps=config.norm_eps, **common)
        self.head = nnx.Linear(config.width, config.vocab_size, kernel_init=nnx.initializers.zeros,
                               kernel_metadata=tfm.logical("embed", "vocab"), bias_metadata=tfm.logical("vocab"),
                               **common)

    def __call__(self, encoded_bpd, targets_bl, *, parallel_b=None, encoded_valid_bp=None) -> jax.Array:
        """Logits [B, L, vocab_size] predicting ``targets_bl``.

        ``parallel_b`` (bool [B], default all False) picks parallel prediction per row;
        ``encoded_valid_bp`` (bool [B, P]) masks padded patch tokens (NaFlex) from cross-attention.
        """
        self._check_targets(targets_bl)
        batch, length = targets_bl.shape
        parallel_b = jnp.zeros((batch,), bool) if parallel_b is None else parallel_b.astype(bool)
        inputs_bl = jnp.where(parallel_b[:, None], self.config.mask_id, shift_right(targets_bl, self.config.bos_id))
        causal_qk = jnp.tril(jnp.ones((length, length), bool))
        self_mask = (causal_qk[None] | parallel_b[:, None, None])[:, None]  # [B, 1, Q, K]
        cross_mask = None if encoded_valid_bp is None else encoded_valid_bp[:, None, None, :]
        x_bld = self._embed(inputs_bl)
        encoded_bpd = encoded_bpd.astype(x_bld.dtype)
        if self.encoder_projection is not None:
            encoded_bpd = self.encoder_projection(encoded_bpd)
        for block in self.blocks:
            x_bld = block(x_bld, encoded_bpd, self_mask, cross_mask)
        return self.head(self.norm(x_bld)).astype(jnp.float32)

    def _embed(self, inputs_bl) -> jax.Array:
        table_vd = constrain(self.embedding.embedding.get_value(), ("act_vocab", "act_embed"))
        x_bld = jnp.take(table_vd, inputs_bl, axis=0).astype(jnp.dtype(self.config.dtype))
        x_bld = x_bld + self.posemb.get_value()[:, :inputs_bl.shape[1]].astype(x_bld.dtype)
        return constrain(x_bld, tfm.ACT_BLD)

    def _check_targets(self, targets_bl) -> None:
        if (targets_bl.ndim != 2 or targets_bl.shape[1] > self.config.max_len
                or not jnp.issubdtype(targets_bl.dtype, jnp.integer)):
            raise ConfigError(f"decoder targets of shape {tuple(targets_bl.shape)} and dtype {targets_bl.dtype} "
                              f"must be integer ids [B, L] with L <= config.decoder.max_len {self.config.max_len}.")


def shift_right(tokens_bl: jax.Array, first: int) -> jax.Array:
    """Teacher forcing's input: ``first`` then the targets without their last token."""
    return jnp.concatenate([jnp.full_like(tokens_bl[:, :1], first), tokens_bl[:, :-1]], axis=1)


def parallel_rows(keys_b: jax.Array, fraction: float) -> jax.Array:
    """bool [B]: the rows decoded by parallel prediction, each drawn from its own key."""
    if fraction <= 0.0:
        return jnp.zeros(keys_b.shape[:1], bool)
    return jax.vmap(lambda key: jax.random.uniform(key) < fraction)(keys_b)


def caption_loss_sums(logits_blv, targets_bl, pad_id: int, loss_mask_bl=None) -> tuple[jax.Array, jax.Array]:
    """Per-example (sum of token cross-entropies, number of tokens), padding excluded, float32.

    The captioning loss of a batch is ``sums.sum() / counts.sum()``: a mean over real tokens,
    so a short caption weighs by its length, as in big_vision's generative trainer.
    ``loss_mask_bl`` (bool [B, L], LocCa) narrows the tokens further: a forced prefix (task token,
    referring phrase, grounded box) is input only, outside the loss."""
    valid_bl = targets_bl != pad_id
    if loss_mask_bl is not None:
        valid_bl = valid_bl & loss_mask_bl.astype(bool)
    logp_blv = jax.nn.log_softmax(logits_blv.astype(jnp.float32), axis=-1)
    token_nll_bl = -jnp.take_along_axis(logp_blv, targets_bl[..., None], axis=-1)[..., 0]
    return jnp.where(valid_bl, token_nll_bl, 0.0).sum(axis=1), valid_bl.sum(axis=1).astype(jnp.float32)


def caption_loss(logits_blv, targets_bl, pad_id: int) -> jax.Array:
    """Mean token cross-entropy over the non-padding targets (0 when there are none)."""
    sums_b, counts_b = caption_loss_sums(logits_blv, targets_bl, pad_id)
    return sums_b.sum() / jnp.maximum(counts_b.sum(), 1.0)


def greedy_captions(decoder: Decoder, encoded_bpd, length: int, *, encoded_valid_bp=None,
                    prefix_bl=None, prefix_len_b=None) -> jax.Array:
    """int32 [B, length]: argmax decoding, one position at a time; after a row's EOS every later
    token is ``pad_id``. Position t's logits depend only on tokens < t (the causal mask), so the
    not-yet-decoded positions of the running sequence can hold anything.

    A forced prefix (LocCa: a task token, then a referring phrase or a grounded box) is
    ``prefix_bl[:, :prefix_len_b]`` (int [B, >= length], int [B]): those positions copy it and
    decoding continues after them (an EOS inside the prefix does not stop the row)."""
    config = decoder.config
    if not 1 <= length <= config.max_len:
        raise ConfigError(f"caption length {length} must be in [1, config.decoder.max_len={config.max_len}].")
    batch = encoded_bpd.shape[0]
    tokens_bl = jnp.full((batch, length), config.pad_id, jnp.int32)
    done_b = jnp.zeros((batch,), bool)
    if prefix_bl is None:
        prefix_bl, prefix_len_b = tokens_bl, jnp.zeros((batch,), jnp.int32)

    def position(t, carry):
        tokens_bl, done_b = carry
        logits_blv = decoder(encoded_bpd, tokens_bl, encoded_valid_bp=encoded_valid_bp)
        next_b = jnp.argmax(logits_blv[:, t], axis=-1).astype(jnp.int32)
        next_b = jnp.where(done_b, config.pad_id, next_b)
        forced_b = t < prefix_len_b
        next_b = jnp.where(forced_b, prefix_bl[:, t].astype(jnp.int32), next_b)
        if config.eos_id is not None:
            done_b = done_b | ((next_b == config.eos_id) & ~forced_b)
        return tokens_bl.at[:, t].set(next_b), done_b

    tokens_bl, _ = jax.lax.fori_loop(0, length, position, (tokens_bl, done_b))
    return tokens_bl


def ngram_overlap(candidates: list[list[int]], references: list[list[int]], max_n: int = 4) -> float:
    """A CIDEr-like n-gram score in [0, 1]: the mean over n = 1..max_n of the clipped n-gram
    precision of each candidate against its reference (BLEU's modified precision, no brevity
    penalty, no IDF), averaged over examples. Enough to tell a decoder that names the right
    colour and shape from one that does not; not a published metric."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} references.")
    scores = []
    for cand, ref in zip(candidates, references):
        per_n = []
        for n in range(1, max_n + 1):
            cand_ngrams, ref_ngrams = _ngrams(cand, n), _ngrams(ref, n)
            total = sum(cand_ngrams.values())
            if total == 0:
                continue
            matched = sum(min(count, ref_ngrams.get(gram, 0)) for gram, count in cand_ngrams.items())
            per_n.append(matched / total)
        scores.append(float(np.mean(per_n)) if per_n else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def _ngrams(tokens, n) -> dict:
    counts: dict = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts
