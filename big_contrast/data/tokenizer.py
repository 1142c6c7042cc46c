"""Text tokenizers and the fixed-length encoding every text tower receives.

Fixed-length convention (all tokenizers): `encode_fixed(tokenizer, text, max_len)` returns
int32 `[max_len]` = the caption's token ids truncated to `max_len - 1`, then one EOS id, then
`PAD_ID = 0` up to `max_len`. The EOS is always present, so a tower may pool at the EOS
position (`argmax(tokens == eos_id)`, CLIP) or at the last non-pad token; padding is 0.

Tokenizers (`make_tokenizer(spec)`):
  * a path to a sentencepiece `.model` file: ids as in the model; our trained models
    (`train_sentencepiece`, `big-contrast data train-tokenizer`) use pad=0, eos=1, unk=2 and
    no BOS (the T5 / big_vision layout). A model without an EOS piece is rejected.
  * `"demo"`: whole words of the demo captions (pad=0, eos=1, unk=2, words from 3), no
    training needed.
  * `"bytes"`: UTF-8 bytes + 3 (pad=0, eos=1, unk=2 unused), vocabulary 259; works for any text.
  * a tokenizer directory written by `big-contrast import` (`interop/tokenizers.py`): a released
    checkpoint's sentencepiece or `tokenizer.json` tokenizer with its own normalisation, padding
    id and length; it brings its own `encode_fixed`, which `encode_fixed` below defers to.
`lowercase=True` lowercases captions before encoding (and before training).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from big_contrast.errors import ConfigError, MissingFileError

PAD_ID = 0


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: pad=0, eos=1, unk=2."""

    eos_id, unk_id = 1, 2
    vocab_size = 256 + 3

    def __init__(self, lowercase: bool = False):
        self.lowercase = lowercase

    def encode(self, text: str) -> list[int]:
        text = text.lower() if self.lowercase else text
        return [b + 3 for b in text.encode("utf-8")]


class WordTokenizer:
    """Whole words from a fixed vocabulary: pad=0, eos=1, unk=2, vocabulary words from 3."""

    eos_id, unk_id = 1, 2

    def __init__(self, vocabulary: Sequence[str], lowercase: bool = True):
        self.lowercase = lowercase
        self.vocabulary = list(vocabulary)
        self._ids = {word: i + 3 for i, word in enumerate(self.vocabulary)}
        self.vocab_size = len(self.vocabulary) + 3

    def encode(self, text: str) -> list[int]:
        text = text.lower() if self.lowercase else text
        return [self._ids.get(word, self.unk_id) for word in re.findall(r"\w+", text)]


class SentencePieceTokenizer:
    """A sentencepiece model (from a `.model` file or its serialized bytes)."""

    def __init__(self, model: str | bytes, lowercase: bool = False):
        if isinstance(model, (str, os.PathLike)):
            from big_contrast import paths

            if not paths.parse(model).is_file():  # local or in a bucket
                raise MissingFileError(f"sentencepiece model {os.fspath(model)!r} does not exist")
            model = paths.read_bytes(model)
        self.lowercase = lowercase
        self._model_proto = bytes(model)
        self._load()

    def _load(self):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        self.eos_id, self.unk_id = self._sp.eos_id(), self._sp.unk_id()
        if self.eos_id < 0:
            raise ConfigError(
                "the sentencepiece model has no EOS piece (eos_id=-1); the fixed-length encoding "
                "appends EOS, so train the model with eos_id set (train_sentencepiece does)")
        self.vocab_size = self._sp.vocab_size()

    def __getstate__(self):  # pickled into grain worker processes
        return {"model": self._model_proto, "lowercase": self.lowercase}

    def __setstate__(self, state):
        self._model_proto, self.lowercase = state["model"], state["lowercase"]
        self._load()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text.lower() if self.lowercase else text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i not in (PAD_ID, self.eos_id)])


def make_tokenizer(spec: str, lowercase: bool = True):
    """`'bytes'`, `'demo'`, a path to a sentencepiece `.model` file or an imported tokenizer dir."""
    from big_contrast.interop.tokenizers import PretrainedTokenizer, is_tokenizer_dir

    if is_tokenizer_dir(spec):
        return PretrainedTokenizer(spec, lowercase)
    if spec == "bytes":
        return ByteTokenizer(lowercase)
    if spec == "demo":
        from big_contrast.data.demo import demo_vocabulary

        return WordTokenizer(demo_vocabulary(), lowercase)
    from big_contrast import paths

    if spec.endswith(".model") or paths.parse(spec).exists():
        return SentencePieceTokenizer(spec, lowercase)
    raise ConfigError(
        f"unknown tokenizer {spec!r}: use 'bytes', 'demo' or the path of a sentencepiece .model "
        "file (train one with `big-contrast data train-tokenizer`)")


def encode_fixed(tokenizer, text: str, max_len: int) -> np.ndarray:
    """Token ids truncated to `max_len - 1`, then EOS, then PAD_ID padding: int32 `[max_len]`
    (a released checkpoint's tokenizer applies its own convention)."""
    if hasattr(tokenizer, "encode_fixed"):
        return tokenizer.encode_fixed(text, max_len)
    ids = tokenizer.encode(text)[: max_len - 1] + [tokenizer.eos_id]
    tokens = np.full((max_len,), PAD_ID, np.int32)
    tokens[: len(ids)] = ids
    return tokens


def train_sentencepiece(captions: Iterable[str], vocab_size: int, *, lowercase: bool = True,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        exact_vocab_size: bool = False) -> bytes:
    """Trains a sentencepiece model in-process and returns the serialized model (`.model` bytes).

    Ids: pad=0, eos=1, unk=2, no BOS. With `exact_vocab_size=False` the vocabulary may come out
    smaller than `vocab_size` when the captions hold too few distinct pieces (small corpora).
    """
    import sentencepiece as spm

    if vocab_size < 4:
        raise ConfigError(f"vocab_size={vocab_size} is too small; it must exceed the 3 special ids")
    sentences = (c.lower() if lowercase else c for c in captions)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=PAD_ID, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=exact_vocab_size,
            minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece training failed: {e}") from None
    return model.getvalue()
