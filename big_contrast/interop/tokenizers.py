"""Tokenizers of released checkpoints, with each family's normalisation, padding and EOS.

A tokenizer directory (``W/tokenizer``, written by ``big-contrast import``) holds the
family's own file (``spiece.model`` or a ``tokenizer.json``) and ``settings.json``:

    kind       'sentencepiece' | 'tokenizers'
    file       the model file inside the directory
    normalize  'none' | 'lower' | 'canonicalize' (big_vision's: lowercase, strip ASCII
               punctuation, collapse white space; SigLIP and open_clip's SigLIP 2) |
               'punctuation' (the same without lowercasing) | 'clip' (open_clip's: ftfy when
               installed, HTML unescaping, white space collapsed, lowercase)
    max_len    every text becomes exactly this many ids (64 for SigLIP, 77 for CLIP)
    pad_id     the padding id (SigLIP pads with EOS = 1, HF CLIP with <|endoftext|>)
    eos_id     appended by sentencepiece; a ``tokenizer.json`` adds its own special
               tokens with its post-processor, as transformers' fast tokenizers do
    padding_side  'right' (default) | 'left' (transformers' Siglip2Tokenizer)

``PretrainedTokenizer(dir)(texts)`` returns int32 ``[n, max_len]``: ids truncated so the
specials fit (the EOS survives truncation), then padded with ``pad_id`` — the ids of
``AutoTokenizer(texts, padding='max_length', truncation=True, max_length=max_len)``.
It also offers ``encode_fixed(text, max_len)``, which the data pipeline uses for these
tokenizers instead of its own fixed-length convention.
"""
from __future__ import annotations

import json
import re
import string

import numpy as np
from etils import epath

from big_contrast.errors import ConfigError, MissingFileError

SETTINGS = "settings.json"
NORMALIZERS = ("none", "lower", "canonicalize", "punctuation", "clip")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str, lower: bool = True) -> str:
    """big_vision's ``prompt_engineering.canonicalize_text``: lowercase, no punctuation, single spaces."""
    text = text.lower() if lower else text
    return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


def clip_clean(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy (if installed), HTML unescaping, collapsed white space, lowercase."""
    import html

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; without it such text may tokenize differently
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip().lower()


def normalize(text: str, how: str) -> str:
    if how == "clip":
        return clip_clean(text)
    if how in ("canonicalize", "punctuation"):
        return canonicalize(text, lower=how == "canonicalize")
    return text.lower() if how == "lower" else text


class PretrainedTokenizer:
    """A family tokenizer from a directory with ``settings.json`` (see the module docstring)."""

    def __init__(self, directory, lowercase: bool = False, settings: dict | None = None):
        directory = epath.Path(directory)
        settings_path = directory / SETTINGS
        if settings is None:
            if not settings_path.exists():
                raise MissingFileError(f"{directory} has no {SETTINGS}; point at a tokenizer "
                                       "directory written by `big-contrast import`.")
            settings = json.loads(settings_path.read_text())
        self.settings = dict(settings)
        self.directory = directory
        self.lowercase = lowercase
        if self.settings["normalize"] not in NORMALIZERS:
            raise ConfigError(f"{settings_path}: normalize={self.settings['normalize']!r} is "
                              f"unknown; use one of {NORMALIZERS}.")
        self.max_len = int(self.settings["max_len"])
        self.pad_id, self.eos_id = int(self.settings["pad_id"]), self.settings.get("eos_id")
        self._load()

    def _load(self):
        data = (self.directory / self.settings["file"]).read_bytes()
        if self.settings["kind"] == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=data)
            self.vocab_size = self._sp.vocab_size()
        elif self.settings["kind"] == "tokenizers":
            import tokenizers

            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            self._tok.no_padding()
            self._tok.no_truncation()
            self.vocab_size = self._tok.get_vocab_size()
        else:
            raise ConfigError(f"tokenizer kind {self.settings['kind']!r} is unknown; use "
                              "'sentencepiece' or 'tokenizers'.")

    def __getstate__(self):  # pickled into grain worker processes
        return {"directory": str(self.directory), "lowercase": self.lowercase,
                "settings": self.settings}

    def __setstate__(self, state):
        self.__init__(state["directory"], state["lowercase"], state["settings"])

    def _normalize(self, text: str) -> str:
        text = normalize(text, self.settings["normalize"])
        return text.lower() if self.lowercase else text

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with the family's special tokens, before truncation and padding."""
        text = self._normalize(text)
        if self.settings["kind"] == "sentencepiece":
            return self._sp.encode(text) + [int(self.eos_id)]
        return self._tok.encode(text).ids

    def encode_fixed(self, text: str, max_len: int | None = None) -> np.ndarray:
        max_len = self.max_len if max_len is None else max_len
        text = self._normalize(text)
        if self.settings["kind"] == "sentencepiece":
            ids = self._sp.encode(text)[: max_len - 1] + [int(self.eos_id)]
        else:
            self._tok.enable_truncation(max_len)
            try:
                ids = self._tok.encode(text).ids
            finally:
                self._tok.no_truncation()
        out = np.full((max_len,), self.pad_id, np.int32)
        if self.settings.get("padding_side", "right") == "left":
            out[max_len - len(ids):] = ids
        else:
            out[: len(ids)] = ids
        return out

    def __call__(self, texts, max_len: int | None = None) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_len = self.max_len if max_len is None else max_len
        return np.stack([self.encode_fixed(t, max_len) for t in texts]).reshape(len(texts), max_len)


def write_tokenizer_dir(directory, *, kind: str, source_file, normalize: str, max_len: int,
                        pad_id: int, eos_id: int | None, padding_side: str = "right",
                        extra_files=()) -> epath.Path:
    """Copies the family's tokenizer file (and ``extra_files``, e.g. tokenizer_config.json)
    into ``directory`` with its ``settings.json``."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source_file = epath.Path(source_file)
    (directory / source_file.name).write_bytes(source_file.read_bytes())
    for extra in extra_files:
        extra = epath.Path(extra)
        if extra.exists():
            (directory / extra.name).write_bytes(extra.read_bytes())
    settings = dict(kind=kind, file=source_file.name, normalize=normalize, max_len=max_len,
                    pad_id=pad_id, eos_id=eos_id, padding_side=padding_side)
    (directory / SETTINGS).write_text(json.dumps(settings, indent=1))
    return directory


def is_tokenizer_dir(spec: str) -> bool:
    try:
        return (epath.Path(spec) / SETTINGS).exists()
    except Exception:  # noqa: BLE001 - not a path at all
        return False
