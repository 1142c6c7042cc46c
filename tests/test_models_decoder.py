"""The captioning decoder: causal mask, parallel prediction, padding masked out of the loss,
greedy decoding, the n-gram score, and the config's sentences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from big_contrast.models.decoder import (
    Decoder, DecoderConfig, caption_loss, caption_loss_sums, greedy_captions, ngram_overlap, parallel_rows,
    shift_right)

VOCAB, LENGTH, PATCHES, ENC_WIDTH = 11, 6, 5, 24


def random_decoder(seed=0, **overrides):
    """A tiny decoder with every weight random (the zero-initialised head too, so logits vary)."""
    config = DecoderConfig(vocab_size=VOCAB, max_len=LENGTH, width=16, depth=2, num_heads=2, mlp_dim=32,
                           encoder_width=ENC_WIDTH, **overrides)
    decoder = Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(decoder)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def decoder():
    return random_decoder()


def inputs(seed, batch=3):
    rng = np.random.default_rng(seed)
    encoded = jnp.asarray(rng.normal(size=(batch, PATCHES, ENC_WIDTH)), jnp.float32)
    targets = jnp.asarray(rng.integers(2, VOCAB, size=(batch, LENGTH)), jnp.int32)
    return encoded, targets


def test_logits_at_a_position_do_not_change_when_later_tokens_change(decoder):
    encoded, targets = inputs(1)
    logits = decoder(encoded, targets)
    for t in range(LENGTH):
        changed = targets.at[:, t:].set((targets[:, t:] + 3) % VOCAB)
        other = decoder(encoded, changed)
        # Position t predicts target t from targets < t: positions <= t are unchanged.
        np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], atol=1e-5)
        if t + 1 < LENGTH:  # and the test can fail: a later position does see the change
            assert np.abs(np.asarray(other[:, t + 1:] - logits[:, t + 1:])).max() > 1e-3


def test_teacher_forcing_input_is_the_target_shifted_right():
    tokens = jnp.asarray([[5, 6, 7], [8, 9, 0]])
    np.testing.assert_array_equal(shift_right(tokens, first=1), [[1, 5, 6], [1, 8, 9]])


def test_parallel_rows_see_no_tokens_and_attend_both_ways(decoder):
    encoded, targets = inputs(2)
    parallel = jnp.asarray([True, False, True])
    logits = decoder(encoded, targets, parallel_b=parallel)
    other = decoder(encoded, (targets + 1) % VOCAB, parallel_b=parallel)
    # Parallel rows depend on the image alone; the autoregressive row does see its tokens.
    np.testing.assert_allclose(other[parallel], logits[parallel], atol=1e-6)
    assert np.abs(np.asarray(other[1] - logits[1])).max() > 1e-3
    # Each parallel row equals that row decoded alone (no leak across rows), and a different
    # image changes it.
    alone = decoder(encoded[:1], targets[:1], parallel_b=parallel[:1])
    np.testing.assert_allclose(alone[0], logits[0], atol=1e-5)
    assert np.abs(np.asarray(decoder(encoded[::-1], targets, parallel_b=parallel)[0] - logits[0])).max() > 1e-3


def test_parallel_rows_are_drawn_per_key_at_the_configured_rate():
    keys = jax.random.split(jax.random.key(0), 4000)
    rows = np.asarray(parallel_rows(keys, 0.75))
    assert abs(rows.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)
    np.testing.assert_array_equal(parallel_rows(keys, 0.75), rows)  # a function of the keys
    assert not np.asarray(parallel_rows(keys, 0.0)).any()


def test_caption_loss_is_the_token_mean_with_padding_masked(decoder):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, LENGTH, VOCAB)).astype(np.float32)
    targets = rng.integers(1, VOCAB, size=(3, LENGTH))
    targets[0, 4:] = 0
    targets[2, 1:] = 0
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    valid = targets != 0
    expected = nll[valid].sum() / valid.sum()
    loss = caption_loss(jnp.asarray(logits), jnp.asarray(targets), pad_id=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Logits at padded positions do not move the loss (and at real ones they do).
    moved = logits.copy()
    moved[~valid] += rng.normal(size=moved[~valid].shape).astype(np.float32) * 5
    np.testing.assert_allclose(caption_loss(jnp.asarray(moved), jnp.asarray(targets), 0), loss, rtol=1e-6)
    moved[valid] += 1.0 * rng.normal(size=moved[valid].shape).astype(np.float32)
    assert abs(float(caption_loss(jnp.asarray(moved), jnp.asarray(targets), 0)) - float(loss)) > 1e-3
    sums, counts = caption_loss_sums(jnp.asarray(logits), jnp.asarray(targets), 0)
    np.testing.assert_array_equal(counts, valid.sum(1))
    np.testing.assert_allclose(sums, np.where(valid, nll, 0).sum(1), rtol=1e-5)


def test_a_fresh_decoder_predicts_the_uniform_distribution():
    config = DecoderConfig(vocab_size=VOCAB, max_len=LENGTH, width=16, depth=1, num_heads=2, mlp_dim=32)
    decoder = Decoder(config, rngs=nnx.Rngs(0))
    encoded, targets = inputs(4)
    loss = caption_loss(decoder(encoded[..., :16], targets), targets, pad_id=0)
    np.testing.assert_allclose(loss, np.log(VOCAB), rtol=1e-6)


def test_greedy_captions_equal_argmax_decoding_one_position_at_a_time():
    decoder = random_decoder(seed=5, eos_id=3)
    encoded, _ = inputs(5, batch=4)
    captions = np.asarray(jax.jit(lambda e: greedy_captions(decoder, e, LENGTH))(encoded))
    for row in range(encoded.shape[0]):
        tokens, done = [], False
        for t in range(LENGTH):
            if done:
                tokens.append(0)
                continue
            padded = jnp.asarray([tokens + [0] * (LENGTH - t)], jnp.int32)
            next_token = int(jnp.argmax(decoder(encoded[row:row + 1], padded)[0, t]))
            tokens.append(next_token)
            done = next_token == 3
        np.testing.assert_array_equal(captions[row], tokens)


def test_a_loss_mask_keeps_a_forced_prefix_out_of_the_loss():
    """LocCa: the task token and a referring phrase are inputs only; the mask narrows the padding rule."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, LENGTH, VOCAB)).astype(np.float32)
    targets = rng.integers(1, VOCAB, size=(3, LENGTH))
    targets[1, 5:] = 0
    mask = np.zeros((3, LENGTH), bool)
    mask[0, 2:] = True
    mask[1, 3:] = True  # reaches into row 1's padding: padding still counts for nothing
    mask[2, 1] = True
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    counted = mask & (targets != 0)
    sums, counts = caption_loss_sums(jnp.asarray(logits), jnp.asarray(targets), 0, jnp.asarray(mask))
    np.testing.assert_array_equal(counts, counted.sum(1))
    np.testing.assert_allclose(sums, np.where(counted, nll, 0).sum(1), rtol=1e-5)
    moved = logits.copy()
    moved[~counted] += 5.0  # logits at prefix / padding positions do not move the loss
    np.testing.assert_allclose(caption_loss_sums(jnp.asarray(moved), jnp.asarray(targets), 0, jnp.asarray(mask))[0],
                               sums, rtol=1e-6)


def test_greedy_decoding_after_a_forced_prefix_equals_argmax_one_position_at_a_time():
    """Rows copy their prefix (an EOS in it does not stop them), then continue by argmax; a row
    with an empty prefix decodes as without one."""
    decoder = random_decoder(seed=8, eos_id=3)
    encoded, prompts = inputs(8, batch=3)
    prompts = prompts.at[0, 1].set(3)  # an EOS inside row 0's prefix
    prefix_len = jnp.asarray([3, 0, 2], jnp.int32)
    captions = np.asarray(jax.jit(lambda e, p, n: greedy_captions(decoder, e, LENGTH, prefix_bl=p, prefix_len_b=n))(
        encoded, prompts, prefix_len))
    for row in range(3):
        tokens, done = [int(x) for x in prompts[row, :int(prefix_len[row])]], False
        for t in range(len(tokens), LENGTH):
            if done:
                tokens.append(0)
                continue
            padded = jnp.asarray([tokens + [0] * (LENGTH - t)], jnp.int32)
            tokens.append(int(jnp.argmax(decoder(encoded[row:row + 1], padded)[0, t])))
            done = tokens[-1] == 3
        np.testing.assert_array_equal(captions[row], tokens)
    np.testing.assert_array_equal(captions[1], np.asarray(greedy_captions(decoder, encoded, LENGTH))[1])


def test_cross_attention_ignores_masked_patch_tokens(decoder):
    encoded, targets = inputs(6)
    valid = jnp.asarray([[True] * 3 + [False] * 2] * 3)
    logits = decoder(encoded, targets, encoded_valid_bp=valid)
    noisy = encoded.at[:, 3:].set(100.0)
    np.testing.assert_allclose(decoder(noisy, targets, encoded_valid_bp=valid), logits, atol=1e-5)
    np.testing.assert_allclose(decoder(encoded[:, :3], targets), logits, atol=1e-5)


def test_ngram_overlap_scores_matches_and_clips_repeats():
    assert ngram_overlap([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert ngram_overlap([[4, 5]], [[1, 2, 3]]) == 0.0
    # Unigram precision 1/3 (one clipped '1'), bigram 0 -> mean 1/6.
    assert ngram_overlap([[1, 1, 1]], [[1, 2]], max_n=2) == pytest.approx(1 / 6)


@pytest.mark.parametrize("field, value, words", [
    ("parallel_fraction", 1.5, "parallel_fraction=1.5 must be in [0, 1]"),
    ("depth", 0, "depth=0 must be a positive integer"),
    ("num_heads", 3, "not divisible by num_heads 3"),
    ("pad_id", 99, "pad_id=99 is not a token id"),
])
def test_a_bad_decoder_config_fails_with_a_sentence(field, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        DecoderConfig(**{**dict(vocab_size=VOCAB, max_len=LENGTH, width=16, num_heads=2), field: value})


def test_targets_longer_than_max_len_fail_with_a_sentence(decoder):
    encoded, _ = inputs(7)
    with pytest.raises(ValueError, match="config.decoder.max_len"):
        decoder(encoded, jnp.zeros((3, LENGTH + 1), jnp.int32))
