"""Tokenizers: text <-> token ids, and rebuilding one from the metadata it saved.

    "char"       one token per Unicode character; the vocabulary is the sorted characters of the text
    "byte"       the 256 byte values of the UTF-8 encoding
    "gpt2"       GPT-2 BPE through tiktoken (50257 tokens; the `bpe` extra)
    "synthetic"  the synthetic task's own words (synthetic.py)

`get_tokenizer` builds one by name; each tokenizer's `to_meta()` is saved in a dataset's meta.json and a
checkpoint's config.json, and `tokenizer_from_meta` rebuilds the same tokenizer from it. TOKENIZERS are
the names DataConfig.tokenizer takes ("auto" = the synthetic task's own, else char; data.prepare decides).
"""

from __future__ import annotations

import numpy as np

from quietgpt.data import synthetic
from quietgpt.errors import QuietError

TOKENIZERS = ("auto", "char", "byte", "gpt2")


class Tokenizer:
    """Text <-> token ids. Subclasses set `name` and `vocab_size`."""

    name: str = ""
    vocab_size: int = 0

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as a 1-D integer array (what prepare uses: fast for large texts)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_meta(self) -> dict:
        """Everything needed to rebuild this tokenizer (saved in meta.json and checkpoints)."""
        return {"name": self.name, "vocab_size": self.vocab_size}


class CharTokenizer(Tokenizer):
    """One token per Unicode character; the vocabulary is the sorted set of the text's characters."""

    name = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted, for searchsorted

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        bad = (ids >= self.vocab_size) | (self._codes[np.minimum(ids, self.vocab_size - 1)] != codes)
        if bad.any():
            c = chr(int(codes[np.argmax(bad)]))
            raise QuietError(f"character {c!r} is not in this dataset's vocabulary of {self.vocab_size} "
                             "characters; use only characters that occur in the training text")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_meta(self) -> dict:
        return {**super().to_meta(), "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 encoding; decoding replaces broken sequences with U+FFFD."""

    name = "byte"
    vocab_size = 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE through tiktoken (50257 tokens). Needs tiktoken and its cached gpt2 encoding files."""

    name = "gpt2"

    def __init__(self):
        try:
            import tiktoken
        except ImportError:
            raise QuietError("the gpt2 tokenizer needs tiktoken: pip install 'quietgpt[bpe]', "
                             "or use --set data.tokenizer=char") from None
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its files over the network on first use
            reason = " ".join(str(e).split())[:120] or type(e).__name__
            raise QuietError(f"cannot load tiktoken's gpt2 encoding ({reason}); run once with internet access "
                             "(files are cached in TIKTOKEN_CACHE_DIR) or use --set data.tokenizer=char") from None
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


class SyntheticTokenizer(Tokenizer):
    """The synthetic task's words (NEW SET GET NONE k* v* f*), separated by whitespace in text."""

    name = "synthetic"

    def __init__(self, spec: synthetic.SyntheticSpec = synthetic.SPEC):
        self.spec = spec
        self.words = synthetic.vocabulary(spec)
        self.vocab_size = len(self.words)
        self.stoi = {w: i for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[w] for w in text.split()]
        except KeyError as e:
            raise QuietError(f"{e.args[0]!r} is not a word of the synthetic task; use NEW, SET, GET, NONE, "
                             f"k0..k{self.spec.n_keys - 1}, v0..v{self.spec.n_values - 1}, "
                             f"f0..f{self.spec.n_fillers - 1}") from None

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    def to_meta(self) -> dict:
        return {**super().to_meta(), "spec": synthetic.describe(self.spec)}


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """A tokenizer by name; "char" builds its vocabulary from `text`."""
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer needs the text to build its vocabulary")
        return CharTokenizer.from_text(text)
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "synthetic":
        return SyntheticTokenizer()
    raise QuietError(f"unknown tokenizer {name!r}; choose auto, char, byte or gpt2")


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild a tokenizer from a meta.json dict (or its "tokenizer" entry)."""
    tm = meta.get("tokenizer", meta)
    if not isinstance(tm, dict) or "name" not in tm:
        raise QuietError("dataset metadata has no tokenizer entry; delete the cache folder and prepare again")
    name = tm["name"]
    if name == "char":
        return CharTokenizer(tm["chars"])
    if name == "synthetic":
        spec = {k: v for k, v in tm.get("spec", {}).items() if k != "generator_version"}
        return SyntheticTokenizer(synthetic.SyntheticSpec(**spec))
    return get_tokenizer(name)
