"""Data: tokenizers, prepare (cache, reuse, invalidation, atomicity), sources, get_batch, bad input."""

import io
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from quietgpt.cli import main
from quietgpt.config import DataConfig
from quietgpt.data import sources as D
from quietgpt.data import synthetic
from quietgpt.data import tokenizers as TK
from quietgpt.errors import ConfigError, QuietError

SHARED = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nÀ bientôt — ça va? ✓\n" * 20


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.fixture
def txt(tmp_path):
    p = tmp_path / "input.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def cfg(source, tmp_path, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_vocab_and_round_trip():
    tok = TK.CharTokenizer.from_text(TEXT)
    hand = sorted({c for c in TEXT})
    assert tok.chars == hand and tok.vocab_size == len(hand)
    ids = tok.encode(TEXT)
    assert ids == [hand.index(c) for c in TEXT]
    assert tok.decode(ids) == TEXT
    with pytest.raises(QuietError) as e:
        tok.encode("Z€")
    assert "vocabulary" in one_line(e)


def test_byte_tokenizer_matches_utf8_bytes():
    tok = TK.ByteTokenizer()
    assert tok.encode(TEXT) == list(TEXT.encode())
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == 256


@pytest.mark.parametrize("name", ["char", "byte", "synthetic"])
def test_tokenizer_from_meta_rebuilds_the_same_tokenizer(name):
    text = "NEW SET k1 v2 f3 GET k1 v2" if name == "synthetic" else TEXT
    tok = TK.get_tokenizer(name, text)
    meta = json.loads(json.dumps({"tokenizer": tok.to_meta()}))  # through JSON, as on disk
    again = TK.tokenizer_from_meta(meta)
    assert again.name == name and again.vocab_size == tok.vocab_size
    assert again.encode(text) == tok.encode(text)


def test_gpt2_tokenizer_offline_is_a_clean_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("Max retries exceeded with url: /gpt-2/encodings/main/vocab.bpe")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(QuietError) as e:
        TK.get_tokenizer("gpt2")
    assert "gpt2" in one_line(e) and "data.tokenizer=char" in str(e.value)


def test_gpt2_tokenizer_without_tiktoken_is_a_clean_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    with pytest.raises(QuietError) as e:
        TK.get_tokenizer("gpt2")
    assert "pip install" in one_line(e)


def test_gpt2_tokenizer_round_trip_when_its_files_are_cached(monkeypatch):
    tiktoken_load = pytest.importorskip("tiktoken.load")

    def no_network(blobpath):
        raise ConnectionError("tests never download")

    monkeypatch.setattr(tiktoken_load, "read_file", no_network)  # use tiktoken's cache or nothing
    try:
        tok = TK.get_tokenizer("gpt2")
    except QuietError:
        pytest.skip("tiktoken's gpt2 files are not cached here (no network)")
    ids = tok.encode("Hello world")
    assert ids == [15496, 995] and tok.decode(ids) == "Hello world"


def test_unknown_tokenizer_is_a_clean_error(tmp_path, txt):
    with pytest.raises(QuietError) as e:
        TK.get_tokenizer("wordpiece")
    assert "choose" in one_line(e)
    with pytest.raises(ConfigError):
        DataConfig(tokenizer="wordpiece")


# ----------------------------------------------------------------------------- prepare


def test_prepare_text_file_writes_the_hand_encoded_tokens(tmp_path, txt):
    ds = D.prepare(cfg(txt, tmp_path))
    chars = sorted(set(TEXT))
    n_train = int(len(TEXT) * 0.9)  # nanoGPT splits the text at 90%
    want_train = [chars.index(c) for c in TEXT[:n_train]]
    want_val = [chars.index(c) for c in TEXT[n_train:]]
    assert np.fromfile(ds.dir / "train.bin", dtype=np.uint16).tolist() == want_train
    assert np.fromfile(ds.dir / "val.bin", dtype=np.uint16).tolist() == want_val
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    assert ds.train.tolist() == want_train and ds.val.tolist() == want_val
    meta = json.loads((ds.dir / "meta.json").read_text())
    assert meta["tokenizer"]["chars"] == chars and meta["vocab_size"] == ds.vocab_size == len(chars)
    assert meta["train_tokens"] == n_train and meta["val_tokens"] == len(TEXT) - n_train
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(txt.read_bytes()).hexdigest()
    assert meta["val_fraction"] == 0.1 and meta["source"] == str(txt)
    assert not ds.reused


def test_prepare_byte_and_val_fraction(tmp_path, txt):
    ds = D.prepare(cfg(txt, tmp_path, tokenizer="byte", val_fraction=0.25))
    n_train = int(len(TEXT) * 0.75)
    assert ds.train.tolist() == list(TEXT[:n_train].encode())
    assert ds.val.tolist() == list(TEXT[n_train:].encode())
    assert ds.vocab_size == 256


def test_prepare_reuses_the_cache_and_rebuilds_when_the_source_changes(tmp_path, txt):
    first = D.prepare(cfg(txt, tmp_path))
    stamps = {f: (first.dir / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")}
    second = D.prepare(cfg(txt, tmp_path))
    assert second.reused and second.dir == first.dir
    assert {f: (first.dir / f).stat().st_mtime_ns for f in stamps} == stamps  # nothing rewritten
    txt.write_text(TEXT + "Something new!\n", encoding="utf-8")
    third = D.prepare(cfg(txt, tmp_path))
    assert not third.reused and third.dir != first.dir
    assert third.tokenizer.decode(np.concatenate([third.train, third.val])) == TEXT + "Something new!\n"
    # another tokenizer or split is another folder
    assert D.prepare(cfg(txt, tmp_path, tokenizer="byte")).dir != third.dir


def test_a_half_written_cache_is_never_trusted(tmp_path, txt):
    ds = D.prepare(cfg(txt, tmp_path))
    good = ds.train.tolist()
    # a killed prepare: .bin files without meta.json
    (ds.dir / "meta.json").unlink()
    (ds.dir / "train.bin").write_bytes(b"\x07\x00" * 5)
    again = D.prepare(cfg(txt, tmp_path))
    assert not again.reused and again.train.tolist() == good
    # a truncated .bin under a meta.json that promises more
    with open(again.dir / "val.bin", "r+b") as f:
        f.truncate(4)
    third = D.prepare(cfg(txt, tmp_path))
    assert not third.reused and len(third.val) == third.meta["val_tokens"]
    assert not [p for p in third.dir.iterdir() if p.name.endswith(".tmp")]


def test_prepare_folder_of_txt_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bbb\n" * 10, encoding="utf-8")
    (folder / "a.txt").write_text("aaa" * 10, encoding="utf-8")  # no final newline: one is added
    (folder / "sub" / "c.txt").write_text("ccc\n" * 10, encoding="utf-8")
    (folder / "ignored.md").write_text("not text data", encoding="utf-8")
    ds = D.prepare(cfg(folder, tmp_path, val_fraction=0.5))
    text = "aaa" * 10 + "\n" + "bbb\n" * 10 + "ccc\n" * 10
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == text
    assert ds.tokenizer.chars == sorted(set(text))


def test_large_vocab_uses_uint32(tmp_path):
    # > 65536 distinct characters (skipping the surrogate range, which UTF-8 cannot hold)
    chars = [chr(i) for i in range(32, 70_100) if not 0xD800 <= i < 0xE000]
    text = "".join(chars) * 2
    p = tmp_path / "wide.txt"
    p.write_text(text, encoding="utf-8")
    ds = D.prepare(cfg(p, tmp_path))
    assert ds.vocab_size == len(chars) > 65536
    assert ds.train.dtype == np.uint32 and ds.meta["dtype"] == "uint32"
    assert ds.tokenizer.decode(ds.val[-5:]) == text[-5:]
    x, _ = D.get_batch(ds.train, 2, 16, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and int(x.max()) < ds.vocab_size


def test_prepare_synthetic(tmp_path):
    ds = D.prepare(DataConfig(cache_dir=str(tmp_path), synthetic_tokens=20_000, synthetic_seed=5))
    ids = synthetic.generate(20_000, 5)
    assert np.array_equal(np.concatenate([ds.train, ds.val]), ids)
    assert len(ds.val) == 2_000 and ds.vocab_size == 52 and ds.tokenizer.name == "synthetic"
    assert ds.meta["irreducible_loss"] == pytest.approx(synthetic.analytic_irreducible_loss())
    assert ds.meta["irreducible_loss"] < ds.meta["irreducible_loss_window"]["128"]
    assert D.prepare(DataConfig(cache_dir=str(tmp_path), synthetic_tokens=20_000, synthetic_seed=5)).reused
    other = D.prepare(DataConfig(cache_dir=str(tmp_path), synthetic_tokens=20_000, synthetic_seed=6))
    assert other.dir != ds.dir
    with pytest.raises(QuietError) as e:
        D.prepare(DataConfig(cache_dir=str(tmp_path), tokenizer="char"))
    assert "data.tokenizer=auto" in one_line(e)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIETGPT_CACHE", str(tmp_path / "q"))
    assert D.user_cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QUIETGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert D.user_cache_dir() == tmp_path / "x" / "quietgpt"
    ds = D.prepare(DataConfig(synthetic_tokens=10_000))
    assert ds.dir.parent == tmp_path / "x" / "quietgpt" / "data"


# ----------------------------------------------------------------------------- tiny Shakespeare


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data/tinyshakespeare.txt is absent")
def test_tiny_shakespeare_from_a_path_matches_nanogpt(tmp_path):
    ds = D.prepare(cfg(SHARED, tmp_path))
    # nanoGPT's data/shakespeare_char/prepare.py prints exactly these
    assert ds.vocab_size == 65
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.tokenizer.decode(ds.train[:14]) == "First Citizen:"
    assert ds.meta["source_sha256"] == D.SHAKESPEARE_SHA256


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data/tinyshakespeare.txt is absent")
def test_shakespeare_char_downloads_once_and_checks_the_hash(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest, timeout=30.0):
        calls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED, dest)

    monkeypatch.setattr(D, "download", fake_download)
    ds = D.prepare(cfg("shakespeare_char", tmp_path))
    assert calls == [D.SHAKESPEARE_URL] and ds.vocab_size == 65
    assert (tmp_path / "cache" / "downloads" / "tinyshakespeare.txt").is_file()
    again = D.prepare(cfg("shakespeare_char", tmp_path))
    assert again.reused and len(calls) == 1


def test_shakespeare_char_offline_says_how_to_fetch_it(tmp_path, monkeypatch):
    def offline(url, dest, timeout=30.0):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D, "download", offline)
    with pytest.raises(QuietError) as e:
        D.prepare(cfg("shakespeare_char", tmp_path))
    msg = one_line(e)
    assert D.SHAKESPEARE_URL in msg and "--data" in msg


def test_shakespeare_char_offline_through_the_real_downloader(tmp_path, monkeypatch):
    # no network: urlopen fails as it does without DNS; the message is about the network, not the disk
    def no_dns(url, timeout=None):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    with pytest.raises(QuietError) as e:
        D.prepare(cfg("shakespeare_char", tmp_path))
    msg = one_line(e)
    assert "cannot download tiny Shakespeare" in msg and "--data" in msg and "disk" not in msg
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data/tinyshakespeare.txt is absent")
def test_real_downloader_writes_the_file_through_a_fake_urlopen(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(SHARED.read_bytes()))
    ds = D.prepare(cfg("shakespeare_char", tmp_path))
    assert ds.vocab_size == 65 and len(ds.train) == 1_003_854


def test_shakespeare_char_with_a_wrong_hash_is_rejected(tmp_path, monkeypatch):
    def corrupt(url, dest, timeout=30.0):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text("<html>captive portal</html>")

    monkeypatch.setattr(D, "download", corrupt)
    with pytest.raises(QuietError) as e:
        D.prepare(cfg("shakespeare_char", tmp_path))
    assert "sha256" in one_line(e)
    assert not (tmp_path / "cache" / "downloads" / "tinyshakespeare.txt").exists()


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_without_datasets_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(QuietError) as e:
        D.prepare(cfg("hf:tiny_shakespeare", tmp_path))
    assert "pip install" in one_line(e)


def test_hf_source_through_a_fake_datasets_module(tmp_path, monkeypatch):
    import types

    rows = [{"id": 1, "text": "hello there"}, {"id": 2, "text": "general kenobi"}] * 30
    seen = {}

    class FakeDS(list):
        column_names = ("id", "text")

    def load_dataset(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return FakeDS(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = D.prepare(cfg("hf:someone/corpus:v1", tmp_path, tokenizer="byte"))
    assert seen == {"name": "someone/corpus", "config": "v1", "split": "train"}
    assert bytes(np.concatenate([ds.train, ds.val]).tolist()).decode() == "\n".join(r["text"] for r in rows)


# ----------------------------------------------------------------------------- get_batch


def test_get_batch_windows_are_the_data_shifted_by_one():
    data = (np.arange(5000) * 7 % 65521).astype(np.uint16)  # distinct values: a window names its offset
    g = torch.Generator().manual_seed(0)
    x, y = D.get_batch(data, 8, 32, g)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        o = int(np.flatnonzero(data == row_x[0])[0])
        assert row_x == data[o:o + 32].tolist() and row_y == data[o + 1:o + 33].tolist()


def test_get_batch_reads_memmaps_and_reproduces_from_a_saved_generator_state(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(3000, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    g = torch.Generator().manual_seed(123)
    D.get_batch(mm, 4, 16, g)
    state = g.get_state()
    a = [D.get_batch(mm, 4, 16, g) for _ in range(3)]
    g2 = torch.Generator()
    g2.set_state(state)
    b = [D.get_batch(mm, 4, 16, g2) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya, xa + 1)  # arange data: y is x shifted by one
    # offsets cover the whole valid range, the last window ending at the last token
    g3 = torch.Generator().manual_seed(0)
    starts = torch.cat([D.get_batch(mm, 64, 16, g3)[0][:, 0] for _ in range(200)])
    assert int(starts.min()) == 0 and int(starts.max()) == 3000 - 17


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_get_batch_on_cuda():
    data = np.arange(1000, dtype=np.uint16)
    x, y = D.get_batch(data, 2, 8, torch.Generator().manual_seed(0), device="cuda")
    assert x.is_cuda and torch.equal(y.cpu(), x.cpu() + 1)


# ----------------------------------------------------------------------------- bad input


def test_missing_source(tmp_path):
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(tmp_path / "nope.txt", tmp_path))
    assert "not a file" in one_line(e)


def test_empty_file_and_folder(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(p, tmp_path))
    assert "empty" in one_line(e)
    p.write_text("  \n\n")
    with pytest.raises(QuietError):
        D.prepare(cfg(p, tmp_path))
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(folder, tmp_path))
    assert "no .txt files" in one_line(e)
    (folder / "a.txt").write_text("")
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(folder, tmp_path))
    assert "empty" in one_line(e)


def test_binary_and_non_utf8_files(tmp_path):
    b = tmp_path / "model.bin"
    b.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(b, tmp_path))
    assert "binary" in one_line(e)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait\n".encode("latin-1") * 10)
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(latin, tmp_path))
    assert "not UTF-8" in one_line(e) and "offset 3" in str(e.value)


def test_text_shorter_than_a_block(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("just a few characters of text here\n" * 3)
    ds = D.prepare(cfg(p, tmp_path))
    D.check_length(ds, 8)
    with pytest.raises(QuietError) as e:
        D.check_length(ds, 64)
    assert "block_size" in one_line(e)
    with pytest.raises(QuietError):
        D.get_batch(ds.val, 2, 64, torch.Generator())
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a")
    with pytest.raises(QuietError) as e:
        D.prepare(cfg(tiny, tmp_path))
    assert "too few" in one_line(e)


# ----------------------------------------------------------------------------- CLI


def test_cli_prepare(tmp_path, txt, capsys):
    rc = main(["prepare", "--data", str(txt), "--set", f"data.cache_dir={tmp_path}", "--set", "model.block_size=64"])
    out = capsys.readouterr().out
    assert rc == 0 and "prepared" in out and str(tmp_path) in out
    assert f"train {int(len(TEXT) * 0.9):,} tokens, val {len(TEXT) - int(len(TEXT) * 0.9):,} tokens" in out
    rc = main(["prepare", "--set", f"data.cache_dir={tmp_path}", "--set", "data.synthetic_tokens=10000"])
    out = capsys.readouterr().out
    assert rc == 0 and "vocab 52" in out and "irreducible loss" in out


def test_cli_prepare_bad_input_exits_2(tmp_path, txt, capsys):
    assert main(["prepare", "--data", str(tmp_path / "missing.txt"), "--set", f"data.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    # the text is shorter than the preset's block_size + 1 per split
    assert main(["prepare", "--data", str(txt), "--set", f"data.cache_dir={tmp_path}",
                 "--set", "model.block_size=1024"]) == 2
    assert "block_size" in capsys.readouterr().err
    assert main(["prepare", "--set", "data.tokenizer=wordpiece"]) == 2
    assert os.path.exists(txt)
