"""SigLIP 2's extra training terms beside the contrastive loss: the captioning decoder (LocCa /
CapPa) today; the step calls this module from a few marked lines (`train/step.py`).

Every extra term is *per example*: a row contributes a numerator (e.g. the sum of its caption
tokens' cross-entropies) and a denominator (its number of tokens), and the term is

    weight(step) * sum over the global batch of numerators / sum of denominators.

That is what makes gradient caching exact for them: the first pass returns each micro-batch's
per-example (numerator, denominator) pairs with the embeddings, the sums over the whole global
batch are formed once, and the gradient of the term w.r.t. each row's numerator
(`weight / sum of denominators`) is the cotangent the second pass feeds to that micro-batch's
`jax.vjp`, beside the embedding gradients. The denominators do not depend on the parameters.
Without gradient caching the same function is differentiated in one pass.

Parallel prediction (CapPa) picks its rows from per-example keys (the step and each row's global
index, folded from `step.patch_keys`), so both passes and a resumed run decode each row alike.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from big_contrast.data.device_ops import normalize_on_device
from big_contrast.errors import ConfigError
from big_contrast.models.decoder import caption_loss_sums, greedy_captions, parallel_rows

# Folded into the patch-dropout keys, so the decoder's draws are independent of the masks.
DECODER_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Terms:
    """Which extra terms a run trains, their weights and when each starts (fixed over a run)."""

    caption_weight: float = 0.0  # 0: no captioning term (the model may still hold a decoder)
    parallel_fraction: float = 0.0  # CapPa: rows decoded with every input masked
    pad_id: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return ("caption",) if self.caption_weight > 0 else ()

    def embed(self, model, images, texts, keys):
        """(zimg, ztxt, {term: [b, 2] per-example (numerator, denominator)}) of one micro-batch.
        `keys`: the rows' patch-dropout keys (None outside training: no parallel rows)."""
        if "caption" not in self.names:
            return model.embed_images(images, keys), model.embed_texts(texts), {}
        zimg, tokens_bnd = model.embed_images_with_tokens(images, keys)
        parallel_b = None
        if keys is not None and self.parallel_fraction > 0:
            decoder_keys = jax.vmap(lambda key: jax.random.fold_in(key, DECODER_STREAM))(keys)
            parallel_b = parallel_rows(decoder_keys, self.parallel_fraction)
        logits_blv = model.decoder(tokens_bnd, texts, parallel_b=parallel_b)
        nll_b, count_b = caption_loss_sums(logits_blv, texts, self.pad_id)
        return zimg, model.embed_texts(texts), dict(caption=jnp.stack([nll_b, count_b], axis=1))

    def weights(self, step) -> dict:
        """Each term's weight at `step` (a traced int)."""
        del step  # the captioning term runs from the first step
        return {"caption": self.caption_weight}

    def total(self, sums: dict, step):
        """(sum of weighted terms, {"loss/<term>": unweighted value}) over the global batch."""
        weights = self.weights(step)
        values = {name: s[:, 0].sum() / jnp.maximum(s[:, 1].sum(), 1.0) for name, s in sums.items()}
        total = sum((weights[name] * value for name, value in values.items()), jnp.zeros((), jnp.float32))
        return total, {f"loss/{name}": value for name, value in values.items()}


def terms_from_config(config) -> Terms | None:
    """The extra terms of a trainer config, or None when it trains the contrastive loss alone."""
    from big_contrast import models

    decoder = models.decoder_config(config.model)
    weight = float(config.get("caption_loss_weight", 1.0))
    if decoder is None:
        return None
    if weight < 0:
        raise ConfigError(f"config.caption_loss_weight={weight} must be >= 0 (SigLIP 2 uses 1.0).")
    return Terms(caption_weight=weight, parallel_fraction=decoder.parallel_fraction, pad_id=decoder.pad_id)


def caption_fn(run, params, image_norm=None):
    """The evaluators' `Encoders.caption`: (images, texts) -> (greedy ids [B, L], token NLL sums
    [B], token counts [B]) of the model's decoder, jitted once per run (params an argument)."""
    key = ("caption", image_norm)
    if key not in run.jitted:

        def caption(params, images, texts):
            model = run.model(params)
            _, tokens_bnd = model.embed_images_with_tokens(normalize_on_device(images, image_norm))
            config = model.decoder.config
            greedy = greedy_captions(model.decoder, tokens_bnd, texts.shape[1])
            nll_b, count_b = caption_loss_sums(model.decoder(tokens_bnd, texts), texts, config.pad_id)
            return greedy, nll_b, count_b

        run.jitted[key] = jax.jit(caption)
    fn = run.jitted[key]
    return lambda images, texts: fn(params, jnp.asarray(images), jnp.asarray(texts, jnp.int32))
