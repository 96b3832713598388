"""Data: sources -> tokenizers (tokenizers.py) -> cached train.bin / val.bin memmaps -> random token batches.

This module holds the sources, `prepare` (tokenise once, cache, reuse), `Dataset`, `check_length` and
`get_batch`; the tokenizers themselves live in tokenizers.py.

Like nanoGPT's prepare.py, a source is tokenised once into flat uint16 token files (uint32 when the
vocabulary needs it) plus a meta.json; training then reads random contiguous windows from memmaps.

Sources (DataConfig.source):
    "synthetic"         the embedded filler/facts/recall corpus (synthetic.py), its own tokenizer
    "shakespeare_char"  tiny Shakespeare (nanoGPT's char-rnn URL), downloaded once, checked by sha256
    PATH                a UTF-8 text file, or a folder of .txt files (sorted, concatenated)
    "hf:NAME[:CONFIG]"  a Hugging Face dataset's train split (needs the `datasets` package)
Tokenizers (DataConfig.tokenizer): "char" (vocabulary = the sorted characters of the text), "byte"
(256 UTF-8 bytes), "gpt2" (tiktoken BPE), and the synthetic task's own; "auto" = synthetic's own, else char.

Cache: <root>/data/<name>-<tokenizer>-<source sha256[:16]>-val<fraction>/ with root = DataConfig.cache_dir,
else $QUIETGPT_CACHE, else $XDG_CACHE_HOME/quietgpt, else ~/.cache/quietgpt. Each file is written
atomically and meta.json last, so a folder without a matching meta.json (a killed prepare) is never
trusted; it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quietgpt.config import DataConfig
from quietgpt.data import synthetic
from quietgpt.data.tokenizers import TOKENIZERS, SyntheticTokenizer, Tokenizer, get_tokenizer, tokenizer_from_meta
from quietgpt.errors import QuietError
from quietgpt.utils.atomic import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the cache layout or tokenisation changes
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


# ----------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """A prepared dataset: token memmaps (1-D, uint16 or uint32) and meta.json's contents."""

    dir: Path
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict
    reused: bool = field(default=False, compare=False)  # True when prepare found a valid cache

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def user_cache_dir() -> Path:
    """$QUIETGPT_CACHE, else $XDG_CACHE_HOME/quietgpt, else ~/.cache/quietgpt."""
    if os.environ.get("QUIETGPT_CACHE"):
        return Path(os.environ["QUIETGPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "quietgpt"


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else user_cache_dir()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- sources -> text


def _decode_utf8(raw: bytes, path: Path) -> str:
    """Text of a file's bytes, or a one-line QuietError for binary / non-UTF-8 / empty content."""
    if b"\x00" in raw[:1 << 20]:
        raise QuietError(f"{path} looks like a binary file (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuietError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it, "
                         "e.g. iconv -f latin1 -t utf-8 IN > OUT, and pass the result") from None
    if not text.strip():
        raise QuietError(f"{path} is empty; pass a text file with content")
    return text.lstrip("\ufeff")


def _read_path(source: str) -> tuple[str, str, str]:
    """(text, name, sha256) of a text file or a folder of .txt files."""
    path = Path(source).expanduser()
    if path.is_file():
        raw = path.read_bytes()
        return _decode_utf8(raw, path), path.stem, _sha256(raw)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise QuietError(f"folder {path} has no .txt files; put UTF-8 .txt files in it or pass a file")
        h = hashlib.sha256()
        parts = []
        for f in files:
            raw = f.read_bytes()
            h.update(str(f.relative_to(path)).encode() + b"\0" + raw + b"\0")
            if not raw.strip():
                continue  # an empty file in a folder is harmless; an all-empty folder is not (below)
            parts.append(_decode_utf8(raw, f))
        if not parts:
            raise QuietError(f"every .txt file in {path} is empty; add text to them")
        # separate files by a newline so the last line of one does not run into the next
        text = "".join(p if p.endswith("\n") else p + "\n" for p in parts)
        return text, path.name, h.hexdigest()
    raise QuietError(f"data source {source!r} is not a file, a folder, or a known source; pass a path to a "
                     "UTF-8 .txt file or folder, or one of synthetic, shakespeare_char, hf:NAME[:CONFIG]")


class DownloadError(Exception):
    """A network failure while downloading (kept apart from OSError, which atomic_write reports as a
    disk problem)."""


def download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch `url` into `dest` atomically; DownloadError when the network fails (tests replace this
    function or urlopen; they never download)."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors
        raise DownloadError(str(getattr(e, "reason", e))) from None

    def write(tmp: str) -> None:
        with response, open(tmp, "wb") as f:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as e:  # connection reset or timeout mid-download
                    raise DownloadError(str(e)) from None
                if not chunk:
                    break
                f.write(chunk)

    atomic_write(dest, write)


def shakespeare_path(root: Path) -> Path:
    """Tiny Shakespeare in the cache (downloading it once), checked against its sha256."""
    dest = root / "downloads" / "tinyshakespeare.txt"
    if not dest.is_file() or _sha256(dest.read_bytes()) != SHAKESPEARE_SHA256:
        log.info("downloading %s -> %s", SHAKESPEARE_URL, dest)
        try:
            download(SHAKESPEARE_URL, dest)
        except QuietError:
            raise
        except Exception as e:  # no network, DNS failure, HTTP error, timeout
            reason = " ".join(str(e).split())[:100] or type(e).__name__
            raise QuietError(f"cannot download tiny Shakespeare ({reason}); fetch it by hand "
                             f"(curl -o input.txt {SHAKESPEARE_URL}) and pass --data input.txt") from None
        if _sha256(dest.read_bytes()) != SHAKESPEARE_SHA256:
            dest.unlink(missing_ok=True)
            raise QuietError(f"the downloaded tiny Shakespeare does not match its sha256; fetch it by hand "
                             f"(curl -o input.txt {SHAKESPEARE_URL}) and pass --data input.txt")
    return dest


def _read_hf(source: str) -> tuple[str, str, str]:
    """(text, name, sha256) of a Hugging Face dataset's train split: its "text" column (or first string
    column), one record per line."""
    spec = source[3:]
    name, _, config = spec.partition(":")
    if not name:
        raise QuietError(f"data source {source!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError:
        raise QuietError("hf: data sources need the datasets package: pip install 'quietgpt[hf]'") from None
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise QuietError(f"cannot load Hugging Face dataset {spec!r} ({reason}); check the name and your "
                         "connection, or save it as .txt and pass --data PATH") from None
    columns = list(getattr(ds, "column_names", None) or (ds[0].keys() if len(ds) else []))
    col = "text" if "text" in columns else next((c for c in columns if isinstance(ds[0][c], str)), None)
    if col is None:
        raise QuietError(f"Hugging Face dataset {spec!r} has no text column; pass a dataset with one")
    text = "\n".join(row[col] for row in ds)
    if not text.strip():
        raise QuietError(f"Hugging Face dataset {spec!r} has no text; pass another dataset")
    return text, name.replace("/", "_") + (f"_{config}" if config else ""), _sha256(text.encode("utf-8"))


# ----------------------------------------------------------------------------- prepare


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _write_tokens(path: Path, ids: np.ndarray) -> None:
    atomic_write(path, lambda tmp: ids.tofile(tmp))


def _load(folder: Path, meta: dict, reused: bool) -> Dataset:
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return Dataset(dir=folder, train=train, val=val, tokenizer=tokenizer_from_meta(meta), meta=meta, reused=reused)


def _valid_cache(folder: Path, want: dict) -> dict | None:
    """meta.json of a complete cache folder that matches `want`, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in want.items()):
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if (folder / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _source_identity(cfg: DataConfig) -> tuple[str, str, str]:
    """(kind, name, sha256) of a source without tokenising it; for synthetic the sha256 is of its recipe."""
    src = cfg.source
    if src == "synthetic":
        recipe = {**synthetic.describe(), "tokens": cfg.synthetic_tokens, "seed": cfg.synthetic_seed}
        return "synthetic", f"synthetic{cfg.synthetic_seed}", _sha256(json.dumps(recipe, sort_keys=True).encode())
    if src == "shakespeare_char":
        return "shakespeare_char", "tinyshakespeare", SHAKESPEARE_SHA256
    if src.startswith("hf:"):
        return "hf", "", ""  # known only after loading
    return "path", "", ""


def _synthetic_split(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The synthetic corpus as train and val ids (split at cfg.val_fraction of its tokens), and what
    meta.json records about it (irreducible losses, statistics, seed)."""
    ids = synthetic.generate(cfg.synthetic_tokens, cfg.synthetic_seed).astype(np.int64)
    n_train = int(len(ids) * (1 - cfg.val_fraction))
    train_ids, val_ids = ids[:n_train], ids[n_train:]
    st = synthetic.stats()
    extra = {
        "irreducible_loss": st["irreducible_loss"],
        "irreducible_loss_window": {str(T): synthetic.window_floor(val_ids, T) for T in (64, 128, 256)},
        "synthetic_stats": st,
        "synthetic_seed": cfg.synthetic_seed,
    }
    return train_ids, val_ids, extra


def prepare(cfg: DataConfig) -> Dataset:
    """Tokenise cfg.source once into <cache>/data/<key>/{train.bin, val.bin, meta.json}; reuse the folder
    when the source (by sha256), tokenizer and split are unchanged.

    Text sources split at int(len(text) * (1 - val_fraction)) characters (as nanoGPT does), the
    synthetic corpus at that fraction of its tokens. Raises QuietError for bad sources.
    """
    if cfg.tokenizer not in TOKENIZERS:
        raise QuietError(f"unknown tokenizer {cfg.tokenizer!r}; choose auto, char, byte or gpt2")
    t0 = time.perf_counter()
    root = _cache_root(cfg)
    kind, name, sha = _source_identity(cfg)
    text = None
    if kind == "synthetic":
        if cfg.tokenizer != "auto":
            raise QuietError(f"the synthetic source has its own tokenizer, not {cfg.tokenizer!r}; "
                             "use --set data.tokenizer=auto")
        tok_name = "synthetic"
    else:
        if kind == "shakespeare_char":
            path = shakespeare_path(root)
            text, _, _ = _read_path(str(path))
        elif kind == "hf":
            text, name, sha = _read_hf(cfg.source)
        else:
            text, name, sha = _read_path(cfg.source)
        tok_name = "char" if cfg.tokenizer == "auto" else cfg.tokenizer

    folder = root / "data" / f"{name}-{tok_name}-{sha[:16]}-val{cfg.val_fraction:g}"
    want = {"format_version": FORMAT_VERSION, "source_sha256": sha, "val_fraction": cfg.val_fraction,
            "tokenizer_name": tok_name}
    meta = _valid_cache(folder, want)
    if meta is not None:
        log.info("reusing prepared data in %s", folder)
        return _load(folder, meta, reused=True)

    extra: dict = {}
    if kind == "synthetic":
        tok: Tokenizer = SyntheticTokenizer()
        train_ids, val_ids, extra = _synthetic_split(cfg)
    else:
        assert text is not None
        tok = get_tokenizer(tok_name, text)
        n_train = int(len(text) * (1 - cfg.val_fraction))
        train_ids, val_ids = tok.encode_array(text[:n_train]), tok.encode_array(text[n_train:])
    if len(train_ids) == 0 or len(val_ids) == 0:
        raise QuietError(f"{cfg.source} has only {len(train_ids) + len(val_ids)} tokens, too few to split into "
                         "train and val; use a longer text")

    dtype = _dtype_for(tok.vocab_size)
    # A re-prepare into an existing folder: drop the old meta.json first, so if we are killed halfway the
    # folder is not trusted with a mix of old and new .bin files.
    (folder / "meta.json").unlink(missing_ok=True)
    _write_tokens(folder / "train.bin", train_ids.astype(dtype))
    _write_tokens(folder / "val.bin", val_ids.astype(dtype))
    meta = {
        **want,
        "source": cfg.source,
        "source_kind": kind,
        "source_path": str(Path(cfg.source).expanduser().resolve()) if kind == "path" else None,
        "tokenizer": tok.to_meta(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "irreducible_loss": None,
        "prepare_s": round(time.perf_counter() - t0, 3),
        **extra,
    }
    atomic_write_json(folder / "meta.json", meta)
    # hand back exactly what a later, cached prepare reads (plain JSON types: numpy scalars from the
    # synthetic statistics would otherwise leak into checkpoints)
    return _load(folder, json.loads(json.dumps(meta, default=float)), reused=False)


def check_length(dataset: Dataset, block_size: int) -> None:
    """QuietError unless both splits hold at least block_size + 1 tokens (one window plus its target)."""
    for split in ("train", "val"):
        n = len(getattr(dataset, split))
        if n < block_size + 1:
            raise QuietError(f"the {split} split of {dataset.meta.get('source')} has {n} tokens, fewer than "
                             f"block_size + 1 = {block_size + 1}; use a longer text or a smaller "
                             "--set model.block_size")


# ----------------------------------------------------------------------------- batches


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows: x, y int64 (batch_size, block_size) on `device`; y is x shifted by one
    (y[:, t] is the token that follows x[:, t] in the data).

    Offsets are drawn from `generator` (a CPU torch.Generator), so restoring generator.get_state()
    restores the data position. One gather from the memmap, one cast to int64.
    """
    n = len(tokens) - block_size
    if n < 1:
        raise QuietError(f"{len(tokens)} tokens are fewer than block_size + 1 = {block_size + 1}; use more "
                         "data or a smaller --set model.block_size")
    ix = torch.randint(n, (batch_size,), generator=generator).numpy()
    # (B, T + 1) window of tokens; x and y are its two overlapping views, made contiguous by the cast
    window = torch.from_numpy(tokens[ix[:, None] + np.arange(block_size + 1)])
    x = window[:, :-1].to(torch.int64).contiguous()
    y = window[:, 1:].to(torch.int64).contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        # pinned host memory lets the copy to the GPU run asynchronously (as nanoGPT does)
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        x, y = x.to(device), y.to(device)
    return x, y
