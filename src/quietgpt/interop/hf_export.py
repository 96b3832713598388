"""Export a quietgpt checkpoint as a Hugging Face model folder (`quietgpt export --checkpoint DIR --hf OUT`).

    softmax      a plain transformers `GPT2LMHeadModel` folder: GPT2LMHeadModel.from_pretrained(OUT), or
                 anything that reads GPT-2 (and `quietgpt eval --hf OUT`). The weights are the same numbers:
                 nn.Linear's (out, in) transposed to Conv1D's (in, out); bias=False becomes zero biases
                 (GPT-2 always has them; adding 0 is exact); gelu "none" -> activation_function "gelu",
                 "tanh" -> "gelu_new"; n_positions = block_size; layer_norm_epsilon 1e-5.
    the others   softmax1, softmax_n, sink, clipped, gated, softpick, outgate, sigmoid and kvbias: a folder
                 with quietgpt's own modeling file (hf_modeling/modeling_quietgpt.py: QuietGPTConfig, model_type
                 "quietgpt", and QuietGPTForCausalLM, which imports only torch and transformers) and `auto_map`
                 in config.json: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True). The weights
                 keep quietgpt's names and layout; the config carries every attention setting (softmax_n,
                 clip_gamma/zeta, gate_mode, sigmoid_bias: "auto" or a number).

Before anything is written the exported model's logits on a random batch are compared with the checkpoint's
(float32); an export that differs by more than 1e-4 is a bug and is never published. The tokenizer goes
alongside: GPT-2 BPE as a GPT2TokenizerFast built offline from tiktoken's cached encoding (when it is not
cached: a note, and the model without a tokenizer); char, byte and the synthetic task's vocabulary as
quietgpt_tokenizer.json (see TOKENIZER_USAGE). quietgpt_export.json records where the export came from.

Nothing half-written: everything is written into a temporary folder beside OUT and renamed to OUT at the
end. OUT must be absent or empty; --force replaces a folder that holds a model (a config.json), never any
other folder, and never the checkpoint itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from quietgpt.errors import QuietError
from quietgpt.interop.hf_import import quiet_hf
from quietgpt.nn.model import GPT
from quietgpt.utils.atomic import atomic_write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILE = "quietgpt_tokenizer.json"
PROVENANCE_FILE = "quietgpt_export.json"
MODELING_FILE = "modeling_quietgpt.py"
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOLERANCE = 1e-4  # max |logit difference| (float32) an export may show; tests hold it to 1e-5
TOKENIZER_USAGE = {
    "char": "one token per Unicode character: ids = [itos.index(c) for c in text]; text = ''.join(itos[i] for i in "
            "ids); a character not in itos cannot be encoded",
    "byte": "the UTF-8 bytes of the text: ids = list(text.encode('utf-8')); text = bytes(ids).decode('utf-8', "
            "errors='replace')",
    "synthetic": "the synthetic task's words, separated by whitespace: ids = [itos.index(w) for w in "
                 "text.split()]; text = ' '.join(itos[i] for i in ids)",
}


def check_dtype(name: str) -> torch.dtype:
    """The torch dtype named by --dtype, or a one-line QuietError listing the choices."""
    if name not in DTYPES:
        raise QuietError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise QuietError("export needs the transformers package; pip install 'quietgpt[hf]'") from None
    return transformers


# ----------------------------------------------------------------------------- models


def to_gpt2(model: GPT, eos_token_id: int | None = None):
    """A transformers GPT2LMHeadModel (eval mode, float32) computing what the softmax `model` computes."""
    c = model.config
    if c.attention != "softmax":
        raise QuietError(f"a {c.attention} model is not a GPT-2; export it with to_quietgpt_hf")
    check_exportable(c)
    transformers = _transformers()
    cfg = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=None, activation_function={"none": "gelu", "tanh": "gelu_new"}[c.gelu], layer_norm_epsilon=1e-5,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, bos_token_id=eos_token_id,
        eos_token_id=eos_token_id, architectures=["GPT2LMHeadModel"])
    with torch.random.fork_rng(devices=[]):  # construction draws random weights; leave the caller's RNG be
        hf = transformers.GPT2LMHeadModel(cfg)
    ours = model.state_dict()
    sd = {}
    for k, v in hf.state_dict().items():
        if k in ours:
            sd[k] = ours[k].t() if k.endswith(TRANSPOSED) else ours[k]
        elif k.endswith(".bias") and not c.bias:
            sd[k] = torch.zeros_like(v)  # quietgpt without biases = GPT-2 with zero biases, exactly
        else:
            raise RuntimeError(f"no quietgpt tensor for GPT-2's {k}")  # a bug: the names are nanoGPT's
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


NOT_EXPORTED_VARIANTS = ("diff",)  # variants modeling_quietgpt.py does not compute (refused in one line)


def check_exportable(c) -> None:
    """One-line QuietError unless modeling_quietgpt.py computes a model of config `c`: its GPT-2 pre-norm
    LayerNorm block with any normaliser variant but diff; not the recipes' norms, block or projections."""
    beyond = [f"{k}={v}" for k, v, plain in (("model.attention", c.attention, c.attention not in NOT_EXPORTED_VARIANTS),
                                             ("model.norm", c.norm, c.norm == "layernorm"),
                                             ("model.block", c.block, c.block == "prenorm"),
                                             ("model.embed_proj", c.embed_proj, not c.embed_proj)) if not plain]
    if beyond:
        raise QuietError(f"the Hugging Face export computes the GPT-2 block with the normaliser variants; this model "
                         f"has {', '.join(beyond)}: keep it as a quietgpt checkpoint (docs/pretrained-and-export.md)")


def to_quietgpt_hf(model: GPT, eos_token_id: int | None = None):
    """QuietGPTForCausalLM (the modeling file's class, eval mode, float32) computing what `model` computes."""
    _transformers()
    check_exportable(model.config)
    from quietgpt.interop.hf_modeling import modeling_quietgpt as mq

    c = model.config
    cfg = mq.QuietGPTConfig(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        bias=c.bias, dropout=c.dropout, attention=c.attention, softmax_n=c.softmax_n, clip_gamma=c.clip_gamma,
        clip_zeta=c.clip_zeta, gelu=c.gelu, gate_init=c.gate_init, sink_init=c.sink_init, gate_mode=c.gate_mode,
        sigmoid_bias=c.sigmoid_bias if c.sigmoid_bias == "auto" else float(c.sigmoid_bias),  # text in GPTConfig
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, architectures=["QuietGPTForCausalLM"],
        auto_map={"AutoConfig": "modeling_quietgpt.QuietGPTConfig",
                  "AutoModelForCausalLM": "modeling_quietgpt.QuietGPTForCausalLM"})
    with torch.random.fork_rng(devices=[]):
        hf = mq.QuietGPTForCausalLM(cfg)
    hf.load_state_dict(model.state_dict(), strict=True)  # same names: the modeling file mirrors model.py
    return hf.eval()


@torch.no_grad()
def max_logit_difference(model: GPT, hf, n_seq: int = 2, seed: int = 0) -> float:
    """max |logits(hf) - logits(model)| over a random (n_seq, block_size) batch, both in float32."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, c.vocab_size, (n_seq, min(c.block_size, 64)), generator=g)
    ours, _ = model(idx)
    theirs = hf(idx).logits
    return float((theirs.float() - ours.float()).abs().max())


# ----------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (encoder.py in openai/gpt-2; HF's ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair tiktoken's BPE merges last to form `token`: run BPE on its bytes with the ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min((ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1))
        if best[0] >= limit:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise QuietError(f"tiktoken's encoding has a token {token!r} no merge forms; it is not a BPE vocabulary")
    return parts[0], parts[1]


def gpt2_tokenizer_from_tiktoken(enc, folder: Path):
    """Save tiktoken encoding `enc` (GPT-2's) in `folder` as a transformers GPT-2 tokenizer and return it.

    tiktoken stores ranks (bytes -> id); GPT-2's vocab.json maps each token's bytes, spelt with GPT-2's
    byte -> character map, to its id, and merges.txt lists the merge forming each multi-byte token in id
    order, which is BPE's merge priority (transformers' TikTokenConverter does the same)."""
    transformers = _transformers()
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special}
    spell = _bytes_to_unicode()
    word = lambda b: "".join(spell[x] for x in b)
    vocab = {word(t): i for t, i in ranks.items()}
    vocab.update({s: enc.encode_single_token(s) for s in enc.special_tokens_set})
    merges = [" ".join(map(word, _merge_of(t, ranks))) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(t) > 1]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        # decode must give tiktoken's text back: older transformers "clean up" spaces before punctuation
        tok = transformers.GPT2TokenizerFast.from_pretrained(tmp, clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(folder))
    return tok


def tokenizer_document(meta: dict) -> dict | None:
    """quietgpt_tokenizer.json's content for a char, byte or synthetic tokenizer meta (None for others):
    {"type", "vocab_size", "itos" (id -> token, except byte), "usage", ...}."""
    name = meta.get("name")
    if name not in TOKENIZER_USAGE:
        return None
    from quietgpt.data.tokenizers import tokenizer_from_meta

    tok = tokenizer_from_meta(meta)
    doc = {"format": "quietgpt-tokenizer", "version": 1, "type": name, "vocab_size": tok.vocab_size,
           "usage": TOKENIZER_USAGE[name]}
    if name == "char":
        doc["itos"] = list(tok.chars)
    elif name == "synthetic":
        doc["itos"] = list(tok.words)
        doc["spec"] = meta.get("spec", {})
    return doc


def write_tokenizer(meta: dict | None, folder: Path) -> str:
    """Write the tokenizer that `meta` (a checkpoint's "tokenizer" entry) describes into `folder`; returns a
    one-line note saying what was written, or why nothing was."""
    if not meta:
        return "no tokenizer: the checkpoint records none"
    doc = tokenizer_document(meta)
    if doc is not None:
        atomic_write_json(folder / TOKENIZER_FILE, doc)
        return f"tokenizer: {TOKENIZER_FILE} ({doc['type']}, {doc['vocab_size']} tokens)"
    if meta.get("name") == "gpt2":
        from quietgpt.data.tokenizers import GPT2Tokenizer

        try:
            enc = GPT2Tokenizer().enc
        except QuietError as e:  # its advice to train with another tokenizer does not apply here
            return "no tokenizer saved: " + re.sub(r",? or use --set data\.tokenizer=\w+", "", str(e))
        gpt2_tokenizer_from_tiktoken(enc, folder)
        return "tokenizer: GPT-2 BPE (GPT2TokenizerFast, built from tiktoken's gpt2 encoding)"
    return f"no tokenizer saved: quietgpt cannot export a {meta.get('name')!r} tokenizer"


# ----------------------------------------------------------------------------- the folder


def _check_out(out: Path, ckpt: Path, force: bool) -> None:
    """QuietError unless OUT may receive the export: absent, an empty folder, or with `force` a folder that
    holds a model (config.json) and neither is nor contains the checkpoint."""
    if not out.exists():
        return
    if not out.is_dir():
        raise QuietError(f"--hf {out} is a file, not a folder; pass a new folder")
    here, src = out.resolve(), ckpt.resolve()
    if here == src or here in src.parents:
        raise QuietError(f"--hf {out} holds the checkpoint {ckpt}; pass another folder (e.g. {ckpt}/hf)")
    if not any(out.iterdir()):
        return
    if not force:
        raise QuietError(f"--hf {out} exists and is not empty; pass a new folder, or --force to replace the model "
                         "in it")
    if not (out / "config.json").is_file():
        raise QuietError(f"--hf {out} is not empty and holds no model (no config.json); --force replaces only a "
                         "model folder, pass a new folder")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`; an old `out` is moved aside first and deleted last (a crash
    between the two renames leaves it in a hidden .OUT.old-* folder beside OUT, never a half-written OUT)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; the published folder gets the usual mode
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint, out, *, force: bool = False, dtype: str = "float32") -> dict:
    """Export the checkpoint folder `checkpoint` (a run folder or its best/) into the folder `out`.

    Returns {"out", "kind" ("gpt2" | "quietgpt"), "attention", "iter", "dtype", "max_logit_diff" (float32,
    vs the checkpoint's GPT), "tokenizer" (a one-line note)}. Raises QuietError (one line) for a missing
    or damaged checkpoint, an unknown dtype, an OUT that is not empty (without force) and a missing
    transformers; on any failure nothing is left at OUT but what was there before.
    """
    check_dtype(dtype)
    from quietgpt.runs.checkpoint import load_model, read_config

    ckpt, out = Path(checkpoint), Path(out)
    doc = read_config(ckpt)
    model, _ = load_model(ckpt)
    check_exportable(model.config)
    _check_out(out, ckpt, force)
    _transformers()
    with quiet_hf():  # the CLI prints its own lines
        return _export(model, doc, ckpt, out, dtype)


def _export(model: GPT, doc: dict, ckpt: Path, out: Path, dtype: str) -> dict:
    """export_checkpoint's work once the inputs are checked: convert, compare, write into a temporary folder,
    publish."""
    tok_meta = doc.get("tokenizer") if isinstance(doc.get("tokenizer"), dict) else None
    gpt2 = tok_meta is not None and tok_meta.get("name") == "gpt2" and model.config.vocab_size > 50256
    eos = 50256 if gpt2 else None  # GPT-2's <|endoftext|>: HF's generate stops there, quietgpt's never stops
    softmax = model.config.attention == "softmax"
    hf = (to_gpt2 if softmax else to_quietgpt_hf)(model, eos)
    diff = max_logit_difference(model, hf)
    if not diff <= TOLERANCE:  # a conversion bug, not bad input: never publish a model that differs
        raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {diff:.3g}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise QuietError(f"cannot write {out}: {e.strerror or e}; choose a writable folder") from None
    try:
        hf.to(DTYPES[dtype]).save_pretrained(str(tmp))
        if not softmax:
            shutil.copyfile(str(resources.files("quietgpt.interop.hf_modeling").joinpath(MODELING_FILE)),
                            tmp / MODELING_FILE)
        note = write_tokenizer(tok_meta, tmp)
        summary = {"out": str(out), "kind": "gpt2" if softmax else "quietgpt", "attention": model.config.attention,
                   "iter": doc.get("iter"), "dtype": dtype, "max_logit_diff": diff, "tokenizer": note}
        from quietgpt.utils.version import __version__

        atomic_write_json(tmp / PROVENANCE_FILE, {"format": "quietgpt-export", "version": 1,
                                                  "quietgpt_version": __version__, "checkpoint": str(ckpt),
                                                  "step_id": doc.get("step_id"),
                                                  **{k: v for k, v in summary.items() if k != "out"}})
        _publish(tmp, out)
    except OSError as e:
        raise QuietError(f"cannot write {out}: {e.strerror or e}; free disk space or choose another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
