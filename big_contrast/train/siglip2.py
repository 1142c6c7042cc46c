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

LocCa (`config.data.decoder_targets`): the batch then holds the decoder's own targets
(`decoder_targets`, `decoder_mask`: the tokens in the loss, `decoder_task`), built by the data
pipeline from each record's caption and boxes (`data/location_targets.py`), and the decoder
predicts those instead of the text tower's tokens; the forced prefix (task token, a referring
phrase, a grounded box) is input only. Parallel prediction then applies to caption rows alone:
a referring expression masked in parallel would hide its own prompt.
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
# The batch fields of LocCa's targets (data/location_targets.py), in the order `embed` takes them.
DECODER_FIELDS = ("decoder_targets", "decoder_mask", "decoder_task")


@dataclasses.dataclass(frozen=True)
class Terms:
    """Which extra terms a run trains, their weights and when each starts (fixed over a run)."""

    caption_weight: float = 0.0  # 0: no captioning term (the model may still hold a decoder)
    parallel_fraction: float = 0.0  # CapPa: rows decoded with every input masked
    pad_id: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return ("caption",) if self.caption_weight > 0 else ()

    def batch_fields(self, batch) -> tuple:
        """The batch's LocCa target arrays (`DECODER_FIELDS`), or () when the decoder predicts the
        text tower's tokens; the step passes them to `embed` beside the images and texts."""
        if "caption" not in self.names or DECODER_FIELDS[0] not in batch:
            return ()
        return tuple(batch[name] for name in DECODER_FIELDS)

    def embed(self, model, images, texts, keys, *decoder_fields):
        """(zimg, ztxt, {term: [b, 2] per-example (numerator, denominator)}) of one micro-batch.
        `keys`: the rows' patch-dropout keys (None outside training: no parallel rows);
        `decoder_fields`: `batch_fields`' arrays (LocCa), else the targets are `texts`."""
        if "caption" not in self.names:
            return model.embed_images(images, keys), model.embed_texts(texts), {}
        targets_bl, loss_mask_bl, task_b = decoder_fields or (texts, None, None)
        zimg, tokens_bnd = model.embed_images_with_tokens(images, keys)
        parallel_b = None
        if keys is not None and self.parallel_fraction > 0:
            decoder_keys = jax.vmap(lambda key: jax.random.fold_in(key, DECODER_STREAM))(keys)
            parallel_b = parallel_rows(decoder_keys, self.parallel_fraction)
            if task_b is not None:  # LocCa: captions only (a prompt must stay visible)
                parallel_b = parallel_b & (task_b == 0)
        logits_blv = model.decoder(tokens_bnd, targets_bl, parallel_b=parallel_b)
        nll_b, count_b = caption_loss_sums(logits_blv, targets_bl, self.pad_id, loss_mask_bl)
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
        if config.data.get("decoder_targets") is not None:
            raise ConfigError("config.data.decoder_targets (LocCa's targets) needs a decoder: set "
                              "config.model.decoder, or unset config.data.decoder_targets.")
        return None
    if weight < 0:
        raise ConfigError(f"config.caption_loss_weight={weight} must be >= 0 (SigLIP 2 uses 1.0).")
    check_decoder_targets(config, decoder)
    return Terms(caption_weight=weight, parallel_fraction=decoder.parallel_fraction, pad_id=decoder.pad_id)


def batch_fields_of(config) -> tuple[str, ...]:
    """The batch fields LocCa adds to what the train step reads (none without decoder targets)."""
    return DECODER_FIELDS if config.data.get("decoder_targets") is not None else ()


def decoder_vocab_size(data_config, text_vocab_size: int | None = None) -> int:
    """The decoder vocabulary LocCa's targets need (text + location + task tokens) for a data
    section with `decoder_targets`; `text_vocab_size` overrides the section's (a config helper)."""
    from big_contrast.data import make_tokenizer
    from big_contrast.data.location_targets import targets_from_config

    section = dict(data_config.decoder_targets)
    if text_vocab_size is not None:
        section["text_vocab_size"] = text_vocab_size
    tokenizer = make_tokenizer(data_config.tokenizer, data_config.lowercase)
    # (the length does not change the vocabulary; at least 7 so a short max_len fails in the pipeline, not here)
    return targets_from_config(section, tokenizer, max(data_config.max_len, 7)).vocab.vocab_size


def check_decoder_targets(config, decoder) -> None:
    """With LocCa's targets the decoder must hold their tokens and their length."""
    if config.data.get("decoder_targets") is None:
        return
    needed = decoder_vocab_size(config.data)
    if decoder.vocab_size < needed:
        raise ConfigError(f"config.model.decoder.vocab_size={decoder.vocab_size} is too small for LocCa's targets "
                          f"(text, location and task tokens): set it to {needed} "
                          "(siglip2.decoder_vocab_size(config.data)).")
    if decoder.max_len < config.data.max_len:
        raise ConfigError(f"config.model.decoder.max_len={decoder.max_len} is shorter than LocCa's targets "
                          f"(config.data.max_len={config.data.max_len}); set it to {config.data.max_len}.")


def caption_fn(run, params, image_norm=None):
    """The evaluators' `Encoders.caption`: (images, targets, loss_mask=None) -> (greedy ids [B, L],
    token NLL sums [B], token counts [B]) of the model's decoder, jitted once per run (params an
    argument). Without `loss_mask` the targets are captions, decoded from the start; with it
    (LocCa's `decoder_mask`) the tokens before a row's first loss position are a forced prefix."""
    key = ("caption", image_norm)
    if key not in run.jitted:

        def caption(params, images, targets, loss_mask):
            model = run.model(params)
            _, tokens_bnd = model.embed_images_with_tokens(normalize_on_device(images, image_norm))
            config = model.decoder.config
            loss_mask = loss_mask & (targets != config.pad_id)
            prefix_len_b = jnp.argmax(loss_mask, axis=1).astype(jnp.int32)  # 0 for captions
            greedy = greedy_captions(model.decoder, tokens_bnd, targets.shape[1], prefix_bl=targets,
                                     prefix_len_b=prefix_len_b)
            nll_b, count_b = caption_loss_sums(model.decoder(tokens_bnd, targets), targets, config.pad_id, loss_mask)
            return greedy, nll_b, count_b

        run.jitted[key] = jax.jit(caption)
    fn = run.jitted[key]

    def call(images, targets, loss_mask=None):
        targets = jnp.asarray(targets, jnp.int32)
        loss_mask = jnp.ones(targets.shape, bool) if loss_mask is None else jnp.asarray(loss_mask, bool)
        return fn(params, jnp.asarray(images), targets, loss_mask)

    return call
