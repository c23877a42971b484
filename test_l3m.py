"""Tests: the model against Hugging Face and itself, the method on toy problems with exact answers.

Run: python -m pytest -q test_l3m.py
"""
import contextlib
import copy
import dataclasses
import fcntl
import gzip
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from pathlib import Path

import numpy as np
import pytest
import torch

import data as D
import l3m
import model as M
import rewards as R
from l3m import (ConstraintEMA, Multipliers, barrier, barrier_grad, chance, lambda_hat, logp_norm,
                 loo_baseline, mu_at, reinforce_surrogate, task_loss)

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Shared fixtures: the demo data and its tokenizer, built once per session; a tiny model trained
# on them


def shared(tmp_path_factory, name):
    """A folder of this session that its pytest-xdist workers share (their base folders'
    parent), or, without xdist, a folder of the one process: what a session fixture builds
    there, it builds once."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


@contextlib.contextmanager
def built_once(folder):
    """Hold a lock beside folder while the caller builds it, so that a second worker waits, then
    reuses it."""
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    # prepare_demo locks and caches on its own
    return D.prepare_demo(shared(tmp_path_factory, "out"), seed=0)


@pytest.fixture(scope="session")
def tok(demo):
    return M.Tokenizer(str(demo.tokenizer))


@pytest.fixture(scope="session")
def data_dir(demo):
    return str(demo.folder.parent)


@pytest.fixture(scope="session")
def tiny_base(demo, tmp_path_factory):
    """A tiny LLaMA trained (SFT, 150 steps, ~20 s) until its rollouts end with EOS at varied
    lengths: seen, test-split lengths with quartiles 18 / 34 / 48 tokens, 88 % ended within 64
    tokens. On such rollouts the rows of a batch have different costs c, so Ĉ differs between a
    rank's batch and the global one, and the EMA differs from the last batch mean: the tests below
    can see a dropped all-reduce or a lost Ĉ."""
    out = shared(tmp_path_factory, "tiny_base")
    with built_once(out):
        if not (out / "final").is_dir():
            run_train(out, str(demo.folder.parent), "--method=sft", "--steps=150",
                      "--batch_size=16", "--micro_batch=16", "--lr=1e-2", "--test=8",
                      "--overwrite=True")
    return str(out / "final")


@contextlib.contextmanager
def one_thread():
    """Tiny models and toy runs are thousands of small ops: more threads only add overhead, and on a
    shared 2-core machine contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# model.py


def tiny_args(n_kv_heads=2, vocab_size=97, **kw):
    return M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                       multiple_of=32, max_seq_len=128, **kw)


def tiny_model(seed=0, **kw):
    return M.Transformer(tiny_args(**kw)).init_weights(seed).eval()


def hf_llama(n_kv_heads, seed=0, vocab_size=101):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv_heads,
                                   vocab_size=vocab_size, rms_norm_eps=1e-5,
                                   rope_theta=500000.0, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    # HF initialises norms to 1; random norm weights make the test see a swapped norm.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


# float32 logits of a 2-layer model are O(1); the two implementations sum in different orders, so
# they agree to ~1e-6. 1e-4 leaves room for that and still catches any wrong permutation or norm
# (errors O(0.1)).
ATOL = 1e-4


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_logits_match_huggingface(n_kv_heads):
    hf = hf_llama(n_kv_heads)
    args = M.ModelArgs.from_hf(hf.config.to_dict())
    assert args.hidden_dim == 96 and args.n_kv_heads == n_kv_heads and args.rope_theta == 500000.0
    ours = M.Transformer(args).eval()
    ours.load_state_dict(M.hf_to_meta(hf.state_dict(), args), strict=True)
    x = torch.randint(0, 101, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= ATOL


def test_convert_huggingface_folder_cli(tmp_path):
    pytest.importorskip("safetensors")
    hf = hf_llama(2, seed=3)
    # Several safetensors shards and an index, as the large releases are published.
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    subprocess.run([sys.executable, os.path.join(HERE, "model.py"), "convert", str(tmp_path / "hf"),
                    str(tmp_path / "ours")], check=True, capture_output=True)
    ours, tok = M.load_model(str(tmp_path / "ours"))
    assert tok is None
    x = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= ATOL


def test_convert_pytorch_bin_folder(tmp_path):
    hf = hf_llama(4, seed=4)
    (tmp_path / "hf").mkdir()
    with open(tmp_path / "hf" / "config.json", "w") as f:
        json.dump(hf.config.to_dict(), f)
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    M.convert(str(tmp_path / "hf"), str(tmp_path / "ours"))
    ours, _ = M.load_model(str(tmp_path / "ours"))
    x = torch.arange(1, 13)[None]
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= ATOL


def test_meta_hf_round_trip_is_exact():
    for kv in (4, 2):
        args = tiny_args(n_kv_heads=kv)
        sd = M.Transformer(args).init_weights(5).state_dict()
        back = M.hf_to_meta(M.meta_to_hf(sd, args), args)
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)
        hf_sd = M.meta_to_hf(sd, args)
        again = M.meta_to_hf(M.hf_to_meta(hf_sd, args), args)
        assert all(torch.equal(again[k], hf_sd[k]) for k in hf_sd)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_then_convert_is_exact(tmp_path, tied):
    """ours -> Hugging Face -> ours gives back every weight bit for bit and the shape; a
    tied embedding (one matrix for input and output, as LLaMA-3.2 1B/3B) is written once
    and marked tied."""
    pytest.importorskip("transformers")  # convert reads config.json the way from_hf expects it
    args = tiny_args(n_kv_heads=2, rope_theta=500000.0)
    model = M.Transformer(args).init_weights(6)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    M.save_checkpoint(model.state_dict(), str(tmp_path / "ours"), args)
    config = M.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert config["tie_word_embeddings"] == tied
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    M.convert(str(tmp_path / "hf"), str(tmp_path / "back"))
    back_args, back = M.read_checkpoint(str(tmp_path / "back"))
    sd = model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps",
              "rope_theta", "max_seq_len")
    assert [getattr(back_args, f) for f in fields] == [getattr(args, f) for f in fields]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_exported_training_output_loads_in_transformers(tmp_path, tiny_base, fmt, monkeypatch):
    """train.py's final/ -> `python model.py export` -> transformers' LlamaForCausalLM gives our
    logits; without safetensors installed the weights go to pytorch_model.bin."""
    transformers = pytest.importorskip("transformers")
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
        subprocess.run([sys.executable, os.path.join(HERE, "model.py"), "export", tiny_base,
                        str(tmp_path / "hf")], check=True, capture_output=True)
    else:
        # `from safetensors.torch import` fails
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
        M.export_hf(tiny_base, str(tmp_path / "hf"))
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(["config.json", "tokenizer.model",
                                                          weights])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours, tok = M.load_model(tiny_base)
    x = torch.tensor([tok.encode("Human: Tell me about the owl.\n\nAssistant: The owl")])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= ATOL
    assert hf.config.eos_token_id == tok.eos_id and hf.config.bos_token_id == tok.bos_id


# -----------------------------------------------------------------------------
# llama.cpp GGUF files and byte-level BPE tokenizers, written here with the gguf and
# tokenizers packages

CHAT_MARKERS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def varied_lines(n, seed=0):
    """n lines of text a tokenizer can get wrong: Unicode (accents, CJK, emoji), digits, runs of
    spaces, tabs and newlines, code, contractions, and ChatML markers between turns."""
    rng = np.random.default_rng(seed)
    words = ["hello", "world", "Ünïcödé", "naïve", "café", "東京", "日本語", "🙂", "🚀🚀", "don't", "we'll",
             "x_1", "2024", "3.14159", "-42", "1,000,000", "def", "f(x):", "return",
             "{'a': [1, 2]}", "==", "->", "#", "   ", "\t", "\n", "\n\n", "  \t ", "The", "quick",
             "brown", "fox", "ǅ", "Ω≈ç√", "™", "...", "?!"]
    lines = []
    for i in range(n):
        text = "".join(str(rng.choice(words)) + str(rng.choice(["", " ", "  ", "\n"]))
                       for _ in range(rng.integers(1, 12)))
        if i % 5 == 0:
            text = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        lines.append(text)
    return lines


def byte_level_bpe(vocab_size=600):
    """(tokens by id, merges "a b") of a byte-level BPE trained on varied_lines, the chat markers
    its first ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_MARKERS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(varied_lines(2000, seed=1), trainer)
    vocab = tk.get_vocab()
    merges = json.loads(tk.to_str())["model"]["merges"]  # pairs
    return sorted(vocab, key=vocab.get), [" ".join(m) if isinstance(m, list) else m for m in merges]


def write_gguf(path, qtype_name, seed=0, add_bos=False, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
               ffn=96):
    """A llama GGUF with random weights in one quantisation type (the norms in F32, as llama.cpp
    writes them), no output.weight (tied), and the byte-level BPE tokenizer. Rows must be whole
    blocks of 32: dim and ffn are."""
    gguf = pytest.importorskip("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    tokens, merges = byte_level_bpe()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    # 3: a control token, 1: a normal one
    w.add_token_types([3 if t in CHAT_MARKERS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)

    def add(name, shape):
        # norms around 1
        a = (rng.standard_normal(shape) * 0.1 + (len(shape) == 1)).astype(np.float32)
        if len(shape) == 1 or qtype_name == "F32":
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    head_dim = dim // n_heads
    add("token_embd.weight", (len(tokens), dim))
    for i in range(n_layers):
        for kind, shape in [("attn_norm", (dim,)), ("attn_q", (n_heads * head_dim, dim)),
                            ("attn_k", (n_kv_heads * head_dim, dim)),
                            ("attn_v", (n_kv_heads * head_dim, dim)),
                            ("attn_output", (dim, dim)), ("ffn_norm", (dim,)),
                            ("ffn_gate", (ffn, dim)), ("ffn_up", (ffn, dim)),
                            ("ffn_down", (dim, ffn))]:
            add(f"blk.{i}.{kind}.weight", shape)
    add("output_norm.weight", (dim,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_converts_as_transformers_loads_it(tmp_path, qtype):
    """`python model.py convert FILE.gguf` against transformers' own GGUF loader (its
    dequantisation and its q/k permutation, not ours): logits within 2e-4 (the same float32
    weights summed in another order: ~1e-6) and the same 20 greedy tokens. The q/k layout,
    exactly: GGUF's attn_q/attn_k rows are our wq/wk as they are, and transformers' q_proj/k_proj
    are them in its rotate-half order."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers loads GGUF files through it
    gguf = pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "tiny.gguf", qtype)
    subprocess.run([sys.executable, os.path.join(HERE, "model.py"), "convert", str(path),
                    str(tmp_path / "ours")], check=True, capture_output=True)
    ours, tok = M.load_model(str(tmp_path / "ours"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf",
                                                           dtype=torch.float32).eval()
    tensors = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type))
               for t in gguf.GGUFReader(str(path)).tensors}
    for ours_key, theirs in (("wq", "q_proj"), ("wk", "k_proj")):
        w = getattr(ours.layers[1].attention, ours_key).weight
        assert torch.equal(w, torch.from_numpy(tensors[f"blk.1.attn_{ours_key[1]}.weight"]))
        hf_w = getattr(hf.model.layers[1].self_attn, theirs).weight
        assert torch.equal(M._rope_permute(f"layers.1.attention.{ours_key}.weight", w, ours.args,
                                           to_hf=True), hf_w)
    x = torch.tensor([tok.encode("<|im_start|>user\nHello, world! "
                                 "2024<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 2e-4
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20,
                         min_new_tokens=20)
    out, _ = M.generate(ours, x.tolist(), 20, eos_id=len(tok.added) + 10 ** 6, temperature=0)
    assert out[0] == theirs[0, x.shape[1]:].tolist()


@pytest.mark.parametrize("add_bos", [False, True])
def test_bpe_tokenizer_matches_transformers(tmp_path, add_bos):
    """Our BPETokenizer, from a GGUF file (built by gguf_tokenizer) and from the Hugging Face folder
    that export writes (convert carries its tokenizer.json), gives transformers' ids on 2,400 varied
    lines, BOS included when the model adds one; decode gives the text back (EOS left out); the chat
    markers are added tokens that ChatML can use."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = write_gguf(tmp_path / "tiny.gguf", "F16", add_bos=add_bos)
    M.convert(str(path), str(tmp_path / "ours"))
    _, tok = M.load_model(str(tmp_path / "ours"))
    M.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    M.convert(str(tmp_path / "hf"), str(tmp_path / "back"))
    _, back = M.load_model(str(tmp_path / "back"))
    references = [transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf"),
                  transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))]
    assert isinstance(tok, M.BPETokenizer) and isinstance(back, M.BPETokenizer)
    lines = varied_lines(2400)
    for reference in references:
        assert [tok.encode(line) for line in lines] == [reference(line)["input_ids"]
                                                        for line in lines]
    assert [back.encode(line) for line in lines] == [tok.encode(line) for line in lines]
    # EOS
    assert all(tok.decode(tok.encode(line, bos=False)) == line.replace("<|im_end|>", "")
               for line in lines)
    assert tok.encode("hi", bos=True)[:1] == [1] * add_bos + tok.encode("hi",
                                                                        bos=False)[:1 - add_bos]
    assert tok.added == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2} and tok.eos_id == 2
    assert D.stop_id(tok, "chatml") == 2 and tok.vocab_size == 600
    # ChatML: prompt + answer are the ids of the whole exchange as transformers tokenises it in
    # one piece
    dialogue = [("user", "Hi there, 2 owls?"), ("assistant", "Yes: two."), ("user", "And café?")]
    whole = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n"
                    for role, text in [("system", "Be brief.")] + dialogue)
    ids = D.encode_prompt(tok, dialogue, "chatml", "Be brief.").tolist()
    ids += D.encode_response(tok, "Oui!", "chatml").tolist()
    assert ids == references[0](whole + "<|im_start|>assistant\nOui!<|im_end|>")["input_ids"]


def test_tokenizers_that_cannot_be_read_are_named(tmp_path):
    """A tokenizer.json the tokenizers library cannot read, a tokenizer.model that is tiktoken
    BPE (LLaMA-3's release), or no tokenizer at all: one error that says what is there and
    what to do."""
    pytest.importorskip("tokenizers")
    args = tiny_args()
    M.save_checkpoint(M.Transformer(args).init_weights(0).state_dict(), str(tmp_path / "json"),
                      args)
    import train
    with pytest.raises(train.ConfigError, match="has no tokenizer: copy the model's "
                       "tokenizer.model .* or tokenizer"):
        train.check_config(train.parse_config([f"--init={tmp_path / 'json'}",
                                               f"--out_dir={tmp_path / 'run'}"]))
    (tmp_path / "json" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(M.CheckpointError, match="is not a Hugging Face tokenizer.json that the "
                       "tokenizers library"):
        M.load_model(str(tmp_path / "json"))
    shutil.copytree(tmp_path / "json", tmp_path / "tiktoken")
    # tiktoken's format: base64 rank
    (tmp_path / "tiktoken" / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(M.CheckpointError, match="is not a sentencepiece model .* tiktoken .* "
                       "tokenizer.json"):
        M.load_model(str(tmp_path / "tiktoken"))


def write_meta(sd, args, dst):
    """Meta's layout, one shard: params.json (Meta's fields only) + consolidated.00.pth."""
    os.makedirs(dst, exist_ok=True)
    params = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("hidden_dim", "max_seq_len")}
    assert M.ModelArgs(**params).hidden_dim == args.hidden_dim  # Meta's rule gives the width back
    torch.save(sd, os.path.join(dst, "consolidated.00.pth"))
    with open(os.path.join(dst, "params.json"), "w") as f:
        json.dump(params, f, indent=2)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_loads(tmp_path, n_shards):
    """A Meta-layout release (params.json + consolidated.NN.pth, model-parallel shards) converts
    exactly."""
    args = tiny_args(n_kv_heads=2)
    ref = M.Transformer(args).init_weights(6).eval()
    sd = ref.state_dict()
    write_meta(sd, args, str(tmp_path / "meta"))
    # split as Meta's model parallelism does: columns for wo/w2 and LLaMA-1/2's embedding
    if n_shards == 2:
        shards = [{}, {}]
        for k, v in sd.items():
            dim = 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
            parts = [v, v] if k.endswith("norm.weight") else v.chunk(2, dim=dim)
            for s, p in zip(shards, parts):
                s[k] = p.clone()
        shards[0]["rope.freqs"] = torch.zeros(8)  # an extra the old releases carry; dropped by name
        os.remove(tmp_path / "meta" / "consolidated.00.pth")
        for i, s in enumerate(shards):
            torch.save(s, tmp_path / "meta" / f"consolidated.{i:02d}.pth")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["vocab_size"] = -1  # as in the LLaMA-1/2 releases: read off the weights
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    M.convert(str(tmp_path / "meta"), str(tmp_path / "ours"))
    ours, _ = M.load_model(str(tmp_path / "ours"))
    assert all(torch.equal(ours.state_dict()[k], sd[k]) for k in sd)


def test_kv_cache_decoding_matches_full_forward():
    """Prefill + one token at a time with left padding gives the logits of the full, unpadded
    forward."""
    model = tiny_model(seed=7)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 2)]
    n_new = 6
    prompts = [s[:max(1, len(s) - 3)] for s in seqs]
    conts = [torch.randint(0, 97, (n_new,), generator=g).tolist() for _ in seqs]
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([P - len(p) for p in prompts])
    cache = M.KVCache(model.args, B, P + n_new, pad, torch.float32, "cpu")
    padded = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    with torch.no_grad():
        step_logits = [M.prefill(model, padded, cache)]
        for t in range(n_new - 1):
            token = torch.tensor([c[t] for c in conts])
            step_logits.append(model(token[:, None], cache, torch.tensor([P + t]))[:, -1])
        for b in range(B):
            full = model(torch.tensor([prompts[b] + conts[b]]))[0]  # (T, V)
            for t in range(n_new):
                ref = full[len(prompts[b]) - 1 + t]
                assert (step_logits[t][b] - ref).abs().max().item() <= ATOL


def test_compiled_decode_step_matches_eager():
    """torch.compile(decode_one_token) (train.py --compile), sampling included, draws eager's tokens
    from the same noise, step after step, and fills the same cache; it is traced once for every
    batch size and cache length (dynamic shapes; the step's own shapes never change with the
    token). Eager and compiled kernels sum in different orders (float32 noise, ~1e-6 on these
    logits), which could flip a token only where u lands within that of a boundary of the CDF."""
    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (g++ or clang++): none on "
                    "PATH")
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # other tests' traces count too
    model, compiled = tiny_model(seed=5), torch.compile(M.decode_one_token, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for B, P, n_new in ((3, 5, 6), (2, 9, 4)):
        pad = torch.randint(0, P, (B,), generator=g)
        tokens = torch.randint(3, 97, (B, P), generator=g)
        caches = [M.KVCache(model.args, B, P + n_new, pad, torch.float32, "cpu") for _ in range(2)]
        with torch.no_grad():
            M.prefill(model, tokens, caches[0]), M.prefill(model, tokens, caches[1])
            for t in range(n_new):
                token, pos = torch.randint(3, 97, (B,), generator=g), torch.tensor([P + t])
                u = torch.rand(B, generator=g)
                eager = M.decode_one_token(model, token, pos, caches[0], u, 1.0, 0.9)
                traced = compiled(model, token, pos, caches[1], u, 1.0, 0.9)
                assert torch.equal(eager[0], traced[0]) and not traced[1].any()
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(caches[0].k, caches[1].k))
    # none for new shapes
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 8, 2]]
    sample = lambda step, prompts=prompts: M.generate(model, prompts, 12, eos_id=2, step=step,
                                                      generator=torch.Generator().manual_seed(1))
    assert sample(compiled) == sample(M.decode_one_token)


def test_compiled_decode_keeps_one_cache_and_one_graph():
    """CompiledDecode, what --compile uses: one persistent KV cache per batch size, whose tensors
    stay where they are from one generate to the next (CUDA graphs replay only then), and one trace
    of the decode step and one of the prefill, with no graph break, for three rollouts of prompts
    of several lengths, each on new weights in new storage (an optimizer step, then FSDP2's
    all-gather), which the graphs read from one held copy; the tokens are eager's (without the
    prefill's padding to 64 tokens). A cache made anew by each generate moves
    the tensors (the address check fails on it); a graph break in the sampling shows in the
    count."""
    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (g++ or clang++): none on "
                    "PATH")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters  # other tests' traces count too
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    model, decode = tiny_model(seed=5), M.CompiledDecode()
    addresses, weights = set(), set()
    for prompts, n in (([[1, 5, 9], [1, 7], [1, 4, 4, 8, 2]], 12),
                       ([[1, 3], [1, 8, 8, 8], [1]], 9), ([[1], [1, 2, 3], [1, 6]], 10)):
        sample = lambda step: M.generate(model, prompts, n, eos_id=2, step=step,
                                         generator=torch.Generator().manual_seed(1))
        assert sample(decode) == sample(M.decode_one_token)
        (cache,) = decode.caches.values()
        addresses.add(tuple(t.data_ptr() for t in cache.k + cache.v))
        weights.add(tuple(p.data_ptr() for p in decode.held.parameters()))
        # new weights in new storage, as a step and FSDP2's next all-gather give them
        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
    assert len(addresses) == 1  # the later, shorter rollouts reused the first one's cache
    assert len(weights) == 1  # the graphs read their weights from the same tensors each time
    assert cache.slots.numel() == decode.BUCKET + 12  # prompts padded to 64 tokens, 12 new ones
    assert counters["stats"]["unique_graphs"] == graphs + 2  # the decode step and the prefill
    assert sum(counters["graph_break"].values()) == breaks


class CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host: on a GPU, each waits for the
    device to finish its queued work."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


def test_generate_reads_the_device_once_every_sync_every_tokens():
    """With sync_every=16 (a GPU's default), N = 40 new tokens of rows that never end cost ⌈40/16⌉
    = 3 host reads in the loop and one for the result; a test of the end of all rows per token
    (a CPU's default, sync_every=1) costs 40. The tokens do not depend on sync_every: rows that end
    early, between two tests, are the same, and the rollout stops at the first test after the last
    row ends."""
    model = tiny_model(seed=3)
    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 8, 2], [1]]
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(len(prompts))]
    for every, reads in ((16, 3 + 1), (1, 40 + 1)):
        # eos_id 1000 is never sampled from 97 tokens (nor fed: the prompts need no padding)
        with CountHostReads() as count:
            out, ended = M.generate(model, [[1, 5, 9, 4]] * 4, 40, eos_id=1000, generator=gens(),
                                    sync_every=every)
        assert count.reads == reads and all(len(o) == 40 for o in out) and not any(ended)
    # EOS = 2 ends the rows at various lengths
    ends = [M.generate(model, prompts, 40, eos_id=2, generator=gens(), sync_every=every)
            for every in (1, 5, 16)]
    lengths = [len(o) for o in ends[0][0]]
    assert ends[0] == ends[1] == ends[2] and len(set(lengths)) > 1 and min(lengths) < 40


def top_p_filter(probs, top_p):
    """The reference nucleus: probs (B, V) with every token outside its top-p nucleus zeroed, by a
    full sort."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    return torch.zeros_like(probs).scatter_(-1, order, M.nucleus(sorted_probs, top_p))


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> mass before each: 0, 0.4, 0.7, 0.85, 0.95
    kept = top_p_filter(probs, 0.8)
    assert torch.equal(kept, torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    g = torch.Generator().manual_seed(0)
    logits = probs.log().expand(20000, 5)
    draws = M.sample_top_p(logits, 1.0, 0.8, torch.rand(20000, generator=g))
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[0] == 0 and counts[2] == 0  # never outside the nucleus
    # Inside it, frequencies follow the renormalised nucleus: 0.4/0.85 etc. The binomial standard
    # error with n = 20000 is ≤ 0.0036; 0.015 is four of them.
    assert torch.allclose(counts / 20000, kept[0].double() / 0.85, atol=0.015)
    # p = 1 samples the whole distribution unchanged.
    u = torch.rand(20000, generator=g)
    full = torch.bincount(M.sample_top_p(logits, 1.0, 1.0, u), minlength=5).double() / 20000
    assert torch.allclose(full, probs[0].double(), atol=0.015)


def test_top_k_then_top_p_as_transformers_orders_them():
    """top_k = 3 keeps 0.4, 0.3, 0.15; renormalised (÷ 0.85) the mass before each is 0, 0.47,
    0.82, so the 0.8 nucleus is the first two: [0.4, 0.3] / 0.7. (Top-p on the raw
    probabilities would keep all three, mass before 0.7 < 0.8: the renormalisation is what
    transformers' top-k-then-top-p does.)"""
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log().expand(20000, 5)
    for top_p, expected in [(0.8, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0]),
                            (1.0, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85])]:
        u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
        draws = M.sample_top_p(logits, 1.0, top_p, u, top_k=3)
        freq = torch.bincount(draws, minlength=5).double() / 20000
        assert all(freq[i] == 0 for i, e in enumerate(expected) if e == 0)  # never outside
        # 4 binomial s.e.
        assert torch.allclose(freq, torch.tensor(expected, dtype=torch.float64), atol=0.015)
    # greedy ignores it
    assert torch.equal(M.sample_top_p(logits[:3], 0, 0.8, top_k=3), torch.tensor([1, 1, 1]))


def test_nucleus_threshold_is_the_sorted_nucleus_exactly():
    """The radix select finds the sort's nucleus boundary exactly: for nuclei of 1 token to most of
    the vocabulary (logit scales 0.3 to 30), τ is the least probability kept by a float64 cumsum of
    the sorted probabilities, and {p ≥ τ} is that nucleus, with any tokens tied with τ (float32
    probabilities of 32,000 tokens tie often). A float32 cumsum as reference would disagree on a few
    rows (its rounding); an off-by-one bucket or a level's lost mass moves τ on most rows."""
    for V in (5, 623, 32000):
        for scale in (0.3, 1.0, 3.0, 10.0, 30.0):
            logits = torch.randn(64, V, generator=torch.Generator().manual_seed(V)) * scale
            probs = torch.softmax(logits, -1)
            for top_p in (0.5, 0.9, 0.95):
                tau = M.nucleus_threshold(probs, top_p)
                s = probs.sort(-1, descending=True)[0]
                s64 = s.double()
                n = ((s64.cumsum(-1) - s64) < top_p).sum(-1)  # the nucleus' size
                assert torch.equal(tau, s.gather(-1, (n - 1)[:, None]).squeeze(-1))
                assert ((probs > tau[:, None]).sum(-1) < n).all()
                assert ((probs >= tau[:, None]).sum(-1) >= n).all()
    # ties at τ all stay: a uniform row keeps every token
    assert M.nucleus_threshold(torch.full((1, 10), 0.1), 0.5).item() == pytest.approx(0.1)
    # a top_p below the fixed point's unit (2^-40) keeps the likeliest token alone, as any top_p <
    # its mass does
    assert torch.equal(M.nucleus_threshold(probs, 1e-13), probs.max(-1).values)


def test_a_rows_draw_ignores_its_batch():
    """With one generator per row, a row samples the same token alone as inside any batch
    (train.py's rollouts rely on it: a row's tokens must not depend on how the global batch
    splits over ranks)."""
    scales = torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(2)) * scales
    for top_k in (0, 50):
        u = M.uniforms([torch.Generator().manual_seed(i) for i in range(6)], 6, 1, "cpu")[0]
        together = M.sample_top_p(logits, 1.0, 0.9, u, top_k=top_k)
        alone = []
        for i in range(6):
            u = M.uniforms([torch.Generator().manual_seed(i)], 1, 1, "cpu")[0]
            alone.append(M.sample_top_p(logits[i:i + 1], 1.0, 0.9, u, top_k=top_k).item())
        assert together.tolist() == alone


def test_top_p_on_a_flat_distribution_samples_the_nucleus():
    """A wide nucleus (~450 of 1,000 nearly equal tokens): exactly the nucleus is sampled, each
    token at its renormalised probability."""
    # nearly flat: the 0.5-nucleus has ~450 tokens
    probs = torch.softmax(torch.linspace(0, 1, 1000), 0)[None]
    kept = top_p_filter(probs, 0.5)
    assert (kept > 0).sum() > 128
    u = torch.rand(50000, generator=torch.Generator().manual_seed(1))
    draws = M.sample_top_p(probs.log().expand(50000, 1000), 1.0, 0.5, u)
    assert (kept[0, draws] > 0).all()
    # each of the ~450 kept tokens has probability ~1/450: with 50000 draws about 110 each, the
    # binomial standard error of a frequency is ~0.00021; 0.0012 is > 5 of them.
    freq = torch.bincount(draws, minlength=1000).double() / 50000
    assert torch.allclose(freq, kept[0].double() / kept.sum(), atol=0.0012)


def test_nan_logits_stop_generate_with_one_error():
    """A NaN in the weights makes NaN logits, from which sampling would return a token all
    the same (searchsorted on a NaN CDF): generate raises instead, naming the first new token
    and the rows."""
    model = tiny_model(seed=8)
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = math.nan
    for temperature in (1.0, 0.0):
        with pytest.raises(FloatingPointError,
                           match=r"NaN logits by new token 0 in rows \[0, 1\]"):
            M.generate(model, [[5, 6], [7]], max_new_tokens=4, eos_id=2, temperature=temperature)


def test_greedy_with_padding_equals_unpadded():
    model = tiny_model(seed=8)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (1, 7, 4, 12)]
    batch, ended = M.generate(model, prompts, max_new_tokens=10, eos_id=2, temperature=0)
    for p, out, e in zip(prompts, batch, ended):
        alone, alone_ended = M.generate(model, [p], max_new_tokens=10, eos_id=2, temperature=0)
        assert out == alone[0] and e == alone_ended[0]
        # and equal to greedy decoding by repeated full forwards: no cache at all
        seq = list(p)
        with torch.no_grad():
            for _ in range(10):
                seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
                if seq[-1] == 2:
                    break
        assert out == seq[len(p):]


class Scripted(M.Transformer):
    """Greedy decoding of this model says token 10 + step, except EOS (2) at each row's scripted
    step."""

    def __init__(self, eos_step, prompt_len):
        super().__init__(tiny_args())
        self.eos_step, self.prompt_len = eos_step, prompt_len

    def forward(self, tokens, cache=None, pos=None):
        super().forward(tokens, cache, pos)
        B, T = tokens.shape
        # tokens generated once this call's logits are sampled
        n = int(pos[-1]) + 1 - self.prompt_len
        logits = torch.zeros(B, T, self.args.vocab_size)
        for b in range(B):
            logits[b, -1, 2 if n == self.eos_step[b] else 10 + n] = 1.0
        return logits


def test_generate_stops_each_row_at_its_eos():
    model = Scripted([1, 3, 99], prompt_len=4).eval()
    out, ended = M.generate(model, [[1, 4, 5, 6], [1, 7], [1]], max_new_tokens=5, eos_id=2,
                            temperature=0)
    # the EOS is part of the response, nothing after it; the third row never ends
    assert out == [[10, 2], [10, 11, 12, 2], [10, 11, 12, 13, 14]]
    assert ended == [True, True, False]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("tok") / "tok"
    text = ["the quick brown fox jumps over the lazy dog", "a short answer",
            "a much longer answer with words"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(path),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, byte_fallback=False, minloglevel=2)
    return str(path) + ".model"


def test_tokenizer_round_trip(sp_model):
    tok = M.Tokenizer(sp_model)
    ids = tok.encode("the lazy fox", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.vocab_size == 60
    assert tok.decode(ids[1:]) == "the lazy fox"


def test_wrong_checkpoints_fail_clearly(tmp_path, sp_model):
    args = tiny_args(vocab_size=60)
    model = M.Transformer(args).init_weights(0)
    good = str(tmp_path / "good")
    M.save_checkpoint(model.state_dict(), good, args, sp_model)
    loaded, tok = M.load_model(good)
    assert tok.vocab_size == 60 and torch.equal(loaded.output.weight, model.output.weight)

    sd = model.state_dict()
    del sd["layers.1.feed_forward.w3.weight"]
    M.save_checkpoint(sd, str(tmp_path / "missing"), args)
    with pytest.raises(M.CheckpointError, match=r"missing key 'layers.1.feed_forward.w3.weight'"):
        M.load_model(str(tmp_path / "missing"))

    sd = model.state_dict()
    sd["layers.0.attention.wk.weight"] = sd["layers.0.attention.wk.weight"][:8]
    M.save_checkpoint(sd, str(tmp_path / "shape"), args)
    with pytest.raises(M.CheckpointError,
                       match=r"'layers.0.attention.wk.weight' has shape \(8, 64\).*\(32, 64\)"):
        M.load_model(str(tmp_path / "shape"))

    other = tiny_args(vocab_size=97)
    M.save_checkpoint(M.Transformer(other).state_dict(), str(tmp_path / "vocab"), other, sp_model)
    with pytest.raises(M.CheckpointError, match=r"60 pieces but args.json says vocab_size=97"):
        M.load_model(str(tmp_path / "vocab"))

    with pytest.raises(M.CheckpointError, match="neither Meta"):
        M.convert(str(tmp_path), str(tmp_path / "x"))


def test_save_checkpoint_replaces_atomically(tmp_path):
    args = tiny_args()
    folder = str(tmp_path / "ckpt")
    M.save_checkpoint(M.Transformer(args).init_weights(0).state_dict(), folder, args)
    second = M.Transformer(args).init_weights(1)
    M.save_checkpoint(second.state_dict(), folder, args)
    loaded, _ = M.load_model(folder)
    assert torch.equal(loaded.output.weight, second.output.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind


# -----------------------------------------------------------------------------
# l3m.py: the barrier, µ, Ĉ, λ̂, ℓ̄, REINFORCE, and the whole procedure on toys with known optima

F64 = torch.float64
SEED = 0  # of the stochastic toy runs; their tolerances were checked on seeds 0–5


# ----------------------------------------------------------------------------- barrier, µ

@pytest.mark.parametrize("mu, s", [(1.0, 1.0), (0.1, 0.01), (1e-3, 1e-6), (0.5, 0.2)])
def test_barrier_continuous_at_junction(mu, s):
    z0 = torch.tensor(-s, dtype=F64)
    assert barrier(z0, mu, s).item() == pytest.approx(-mu * math.log(s), rel=1e-12)
    for h in (1e-6 * s, 1e-9 * s):
        left, right = barrier(z0 - h, mu, s), barrier(z0 + h, mu, s)
        # value: both sides within slope·h (+ rounding) of B(−s)
        assert abs(left - barrier(z0, mu, s)) <= 1.01 * (mu / s) * h + 1e-12
        assert abs(right - barrier(z0, mu, s)) <= 1.01 * (mu / s) * h + 1e-12
        # slope: µ/max(−z, s) on the left is µ/(s + h), on the right µ/s: relative gap h/s
        assert barrier_grad(z0 - h, mu, s).item() == pytest.approx(mu / s, rel=2 * h / s)
        assert barrier_grad(z0 + h, mu, s).item() == pytest.approx(mu / s, rel=1e-15)


@pytest.mark.parametrize("mu, s", [(1.0, 1.0), (0.1, 0.01), (1e-3, 1e-6)])
def test_barrier_convex_and_grad_is_autograd(mu, s):
    # a grid over both branches that contains the junction z = −s exactly
    z = torch.cat([torch.linspace(-3.0, 2.0, 2001, dtype=F64),
                   torch.tensor([-s], dtype=F64)]).unique()
    z.requires_grad_(True)
    (auto,) = torch.autograd.grad(barrier(z, mu, s).sum(), z)
    # float64 rounding of µ/max(−z, s) only
    torch.testing.assert_close(auto, barrier_grad(z.detach(), mu, s), rtol=1e-12, atol=0)
    junction = (z.detach() == -s).nonzero().item()
    assert auto[junction].item() == pytest.approx(mu / s, rel=1e-15)
    # convex: the slope never decreases along z
    assert (barrier_grad(z.detach(), mu, s).diff() >= 0).all()


def test_barrier_tends_to_characteristic_function():
    """Paper Fig. 1: with s = µ², B → 0 on z ≤ 0 and B → +∞ on z > 0 as µ goes 1 → 0.01."""
    mus = [1.0, 0.3, 0.1, 0.03, 0.01]
    z_in = torch.linspace(-2.0, 0.0, 401, dtype=F64)
    z_out = torch.tensor([0.01, 0.1, 1.0], dtype=F64)
    sup_in = [barrier(z_in, mu, mu**2).abs().max().item() for mu in mus]
    out = [barrier(z_out, mu, mu**2) for mu in mus]
    # on [−2, 0] the largest |B| is at z = 0: µ·(1 + 2·log(1/µ)), which → 0 (0.10 at µ = 0.01)
    for mu, sup in zip(mus, sup_in):
        assert sup == pytest.approx(mu * (1 + 2 * math.log(1 / mu)), rel=1e-12)
    assert all(a > b for a, b in zip(sup_in[1:], sup_in[2:]))  # it peaks near µ = 1/√e, then falls
    # for z > 0, B = z/µ + µ + 2µ·log(1/µ) ≥ z/µ → ∞ (at µ = 0.01 at least 100·z)
    for mu, values in zip(mus, out):
        assert (values >= z_out / mu).all()
    # increasing in 1/µ once µ ≤ z (here z = 1)
    assert all(a[-1] < b[-1] for a, b in zip(out, out[1:]))


def test_mu_schedule_exact_ends():
    T = 1000
    assert mu_at(0, T) == 1.0
    assert mu_at(T, T) == 1e-6
    assert mu_at(0, 7, mu_0=3.7, mu_T=2.3e-5) == 3.7
    assert mu_at(7, 7, mu_0=3.7, mu_T=2.3e-5) == 2.3e-5
    mus = np.array([mu_at(t, T) for t in range(T + 1)])
    # one constant ratio γ = (µ_T/µ_0)^(1/T) per step, up to float64 rounding of the powers
    np.testing.assert_allclose(mus[1:] / mus[:-1], 1e-6 ** (1 / T), rtol=1e-12)
    with pytest.raises(ValueError):
        mu_at(T + 1, T)
    with pytest.raises(ValueError):
        mu_at(-1, T)


def test_mu_decay_is_the_schedules_step_ratio():
    for T, mu_0, mu_T in [(1000, 1.0, 1e-6), (7, 3.7, 2.3e-5), (1, 1.0, 1e-6)]:
        for t in sorted({0, T // 2, T - 1}):
            ratio = mu_at(t + 1, T, mu_0, mu_T) / mu_at(t, T, mu_0, mu_T)
            assert ratio == pytest.approx(l3m.mu_decay(T, mu_0, mu_T), rel=1e-12)


# ----------------------------------------------------------------------------- Ĉ, λ̂, multipliers

def test_ema_closed_form():
    g = torch.Generator().manual_seed(0)
    alpha, k = 0.1, 3
    sizes = torch.randint(1, 9, (25,), generator=g).tolist()
    batches = [torch.randn(B, k, generator=g, dtype=F64) for B in sizes]
    means = torch.stack([c.mean(0) for c in batches])  # (n+1, k)
    ema = ConstraintEMA(k, alpha)
    assert torch.equal(ema.update(batches[0]), means[0])  # the first batch initialises Ĉ
    for c in batches[1:]:
        ema.update(c)
    n = len(batches) - 1
    # Ĉ_n = (1 − α)^n·m_0 + Σ_{j=1..n} α(1 − α)^(n−j)·m_j
    w = torch.tensor([(1 - alpha) ** n] + [alpha * (1 - alpha) ** (n - j) for j in range(1, n + 1)],
                     dtype=F64)
    assert w.sum().item() == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(ema.value, w @ means, rtol=1e-12, atol=1e-12)  # float64 rounding


def run_on_ranks(fn, per_rank_args):
    """Run fn(*args, all_reduce) on one thread per simulated rank; all_reduce sums in place over
    them."""
    n = len(per_rank_args)
    sent, results, sync = [None] * n, [None] * n, threading.Barrier(n)

    def rank_main(rank):
        def all_reduce(t):  # like torch.distributed.all_reduce(t) with op SUM
            sent[rank] = t.clone()
            sync.wait()
            t.copy_(sum(sent))
            sync.wait()

        results[rank] = fn(*per_rank_args[rank], all_reduce)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def test_ema_all_reduce_gives_global_mean():
    """Three simulated ranks with 3, 7 and 0 samples all get the mean of the 10."""
    g = torch.Generator().manual_seed(1)
    k = 2
    batches = [torch.randn(3, k, generator=g), torch.randn(7, k, generator=g), torch.zeros(0, k)]
    emas = [ConstraintEMA(k) for _ in batches]
    def update(ema, c, all_reduce):
        return ema.update(c, all_reduce).clone()

    for _ in range(2):  # the first update initialises Ĉ, the second averages
        got = run_on_ranks(update, list(zip(emas, batches)))
    global_mean = torch.cat(batches).double().mean(0)
    for C_hat in got:
        torch.testing.assert_close(C_hat, global_mean, rtol=1e-12, atol=1e-12)  # float64 sums
    # the mean of the rank means differs (3 vs 7 samples): the test would catch it
    assert not torch.allclose((batches[0].mean(0) + batches[1].mean(0)).double() / 2, global_mean,
                              atol=1e-3)
    with pytest.raises(ValueError, match="no samples"):
        ConstraintEMA(k).update(batches[2])


def test_lambda_hat_active_and_inactive():
    k = 4
    for mu in (0.1, 1e-2, 1e-6):
        C_hat = torch.tensor([0.3, 0.0, -(mu**2) / 2, -0.2], dtype=F64, requires_grad=True)
        lam = lambda_hat(C_hat, mu, k)
        assert lam.dtype == torch.float32 and not lam.requires_grad
        # active (Ĉ ≥ −µ²): 1/(kµ), 2.5e5 at µ = 1e-6, k = 4; float32 rounding only
        torch.testing.assert_close(lam[:3], torch.full((3,), 1 / (k * mu)), rtol=1e-6, atol=0)
        assert lam[3].item() == pytest.approx(mu / (k * 0.2), rel=1e-6)  # inactive: µ/(k·(−Ĉ))


def test_barrier_branch_splits_at_minus_mu_squared():
    for mu in (0.1, 1e-3):
        s = l3m.barrier_s(mu)
        assert s == mu**2
        # Ĉ = −µ² itself is on the log side (z ≤ −s in Eq. 9); just above it, linear
        C_hat = torch.tensor([-0.5, -s * (1 + 1e-9), -s, -s * (1 - 1e-9), 0.0, 0.3], dtype=F64)
        assert l3m.barrier_branch(C_hat, mu) == ["log", "log", "log", "linear", "linear", "linear"]


def test_mm_update_is_projected_ascent_on_fresh_C_hat():
    mult = Multipliers(2, "mm", eta_lam=0.5)
    C_hat = mult.observe(torch.tensor([[1.0, -2.0], [3.0, -4.0]]))  # batch mean (2, −3)
    assert torch.equal(mult.lam(mu=0.1), torch.tensor([1.0, 0.0]))  # max(0, 0 + 0.5·Ĉ)
    C_hat = mult.observe(torch.tensor([[-10.0, 7.0]]))  # Ĉ = 0.9·(2, −3) + 0.1·(−10, 7)
    torch.testing.assert_close(C_hat, torch.tensor([0.8, -2.0], dtype=F64), rtol=1e-12, atol=1e-12)
    # 1 + 0.5·0.8; λ_2 stays 0
    torch.testing.assert_close(mult.lam(mu=1e-6), torch.tensor([1.4, 0.0]))


@pytest.mark.parametrize("method, eta", [("l3m", None), ("mm", 0.3)])
def test_multipliers_state_round_trip(method, eta):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 3, generator=g) for _ in range(10)]
    a = Multipliers(3, method, eta)
    for c in batches[:4]:
        a.observe(c)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # plain python numbers: loads with weights_only=True
    buf.seek(0)
    b = Multipliers(3, method, eta)
    b.load_state_dict(torch.load(buf, weights_only=True))
    # older checkpoints nest Ĉ and α under "ema"
    flat, old = a.state_dict(), Multipliers(3, method, eta)
    old.load_state_dict({**{k: flat[k] for k in ("k", "method", "eta_lam", "lam")},
                         "ema": {"alpha": flat["alpha"], "C_hat": flat["C_hat"]}})
    assert torch.equal(old.ema.value, b.ema.value) and torch.equal(old.lam(0.1), b.lam(0.1))
    for step, c in enumerate(batches[4:]):
        mu = mu_at(step, 10)
        assert torch.equal(a.observe(c), b.observe(c))
        assert torch.equal(a.lam(mu), b.lam(mu))
    with pytest.raises(ValueError):
        Multipliers(2, method, eta).load_state_dict(a.state_dict())


def test_step_kind_is_a_fair_coin_keyed_by_seed_and_step():
    """step_kind: the same kind for a (seed, step) wherever it is asked (every rank), heads half
    the time, and the sequences of two seeds independent. Seed 0 from step 1,000,003 on once
    repeated seed 1 from step 0 (a seed of seed·1,000,003 + step); keyed, they agree on about half
    the steps, as independent coins do. Catches a coin that is not shared, not fair, or keyed by an
    arithmetic that collides."""
    import train
    kinds = lambda seed, start: [train.step_kind(train.Config(seed=seed), t)
                                 for t in range(start, start + 4000)]
    a, b = kinds(1, 0), kinds(0, 1_000_003)
    assert a == kinds(1, 0) and set(a) == {"task", "constraint"}
    # 4 standard errors of a fair coin's mean over 4,000 flips, √(.25/4000) = 0.0079
    assert abs(a.count("task") / 4000 - 0.5) < 4 * 0.0079
    assert abs(np.mean([x == y for x, y in zip(a, b)]) - 0.5) < 4 * 0.0079
    assert train.step_kind(train.Config(method="sft"), 3) == "task"
    # --constraint_every=3: two task steps, then a constraint step, with no coin
    every3 = train.Config(constraint_every=3, seed=1)
    assert [train.step_kind(every3, t) for t in range(6)] == ["task", "task", "constraint"] * 2
    # one epoch of 10 task batches: 20 steps by the coin, 15 steps (10 of them task steps) here
    assert train.steps_per_epoch(train.Config(), 10) == 20
    epoch = [train.step_kind(every3, t) for t in range(train.steps_per_epoch(every3, 10))]
    assert len(epoch) == 15 and epoch.count("task") == 10


# ----------------------------------------------------------------------------- ℓ̄ and the surrogate

def test_logp_norm_counts_eos_and_ignores_prompt_and_padding():
    g = torch.Generator().manual_seed(3)
    a, eos = 0, 2
    logits = torch.randn(2, 6, 3, generator=g)
    # row 0: prompt [1, 1], response [a, a, EOS], one pad; row 1: prompt [1], response [EOS], pads
    tokens = torch.tensor([[1, 1, a, a, eos, eos], [1, eos, eos, eos, eos, eos]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    lp = torch.log_softmax(logits, -1)
    # logits[:, t] scores tokens[:, t+1]; the EOS that ended the response is scored and counted
    expected = torch.stack([(lp[0, 1, a] + lp[0, 2, a] + lp[0, 3, eos]) / 3, lp[1, 0, eos]])
    torch.testing.assert_close(logp_norm(logits, tokens, mask), expected)
    # nothing outside the mask matters: the prompt's own scores, padding, the last position
    other = logits.clone()
    other[0, 0], other[0, 4:], other[1, 1:] = 5.0, -5.0, 9.0
    tokens_other = tokens.clone()
    tokens_other[0, :2], tokens_other[0, 5], tokens_other[1, 2:] = 0, 1, 1
    torch.testing.assert_close(logp_norm(other, tokens_other, mask), expected)
    assert task_loss(expected) == -expected.mean()


def test_logp_norm_temperature_bf16_and_errors():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(logp_norm(logits, tokens, mask, temperature=0.7),
                               logp_norm(logits / 0.7, tokens, mask))
    half = logits.bfloat16()
    out = logp_norm(half, tokens, mask)
    assert out.dtype == torch.float32  # computed in float32 from the bf16 logits
    assert torch.equal(out, logp_norm(half.float(), tokens, mask))
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="empty response mask"):
        logp_norm(logits, tokens, empty)
    first = mask.clone()
    first[0, 0] = True
    with pytest.raises(ValueError, match="mask"):
        logp_norm(logits, tokens, first)


def test_token_log_prob_gradient_matches_autograd_across_chunks(monkeypatch):
    """TokenLogProb's hand-written backward, (1[v = y] − softmax(z/τ)) / τ, against autograd through
    log_softmax, in float64, with chunks of 2 positions (so T = 7 ends in a partial chunk) and τ = 1
    and 0.7. From bf16 logits: the gradient comes back in bf16, as autograd's would."""
    monkeypatch.setattr(l3m.TokenLogProb, "chunk", 2 * 3 * 11)  # B·2·V: two positions per chunk
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 7, 11, generator=g, dtype=F64)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g, dtype=F64)
    for temperature in (1.0, 0.7):
        ours = logits.clone().requires_grad_()
        out = l3m.TokenLogProb.apply(ours, targets, temperature)
        ref = logits.clone().requires_grad_()
        expected = torch.log_softmax(ref / temperature, -1).gather(-1,
                                                                   targets[..., None]).squeeze(-1)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        (out * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)
    half = logits.bfloat16().requires_grad_()
    (l3m.TokenLogProb.apply(half, targets, 1.0) * weights.float()).sum().backward()
    assert half.grad.dtype == torch.bfloat16
    ref = logits.bfloat16().float().requires_grad_()
    logp = torch.log_softmax(ref, -1).gather(-1, targets[..., None]).squeeze(-1)
    (logp * weights.float()).sum().backward()
    torch.testing.assert_close(half.grad.float(), ref.grad, rtol=0.01, atol=0.002)  # bf16's 8 bits


MEMORY_PROBE = """
import sys, torch
import l3m
l3m.TokenLogProb.chunk = 2**18  # 1 MB of float32 per chunk
B, T, V = 8, 64, 32000
logits = torch.randn(B, T, V).requires_grad_()
tokens = torch.randint(0, V, (B, T))
mask = torch.zeros(B, T, dtype=torch.bool)
mask[:, 8:] = True
# once small: torch's own first-use allocations are not ℓ̄'s
small = logits[:2, :4].detach().requires_grad_()
l3m.logp_norm(small, tokens[:2, :4], mask[:2, :4] | (torch.arange(4) > 0), 1.0).sum().backward()
def peak():  # this process's peak resident memory (ru_maxrss would start at the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
base = peak()
l3m.logp_norm(logits, tokens, mask, float(sys.argv[1])).sum().backward()
print((peak() - base) / logits.nbytes)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="reads VmHWM from /proc (Linux)")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logp_norm_peak_memory_is_the_gradient_and_a_chunk(temperature):
    """Forward and backward of ℓ̄ on float32 logits (8 × 64 × 32000, 66 MB) raise the process's peak
    memory (VmHWM, in a fresh process) by one copy of the logits, the gradient, plus a few 1 MB
    chunks: measured 1.03, asked ≤ 1.2. Autograd through slice, cast, division, logsumexp and gather
    held 4.0 copies at its peak."""
    p = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(temperature)], cwd=HERE,
                       env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    copies = float(p.stdout)
    assert 0.9 <= copies <= 1.2, copies


def test_surrogate_gradient_is_eq11_term_by_term():
    """∇ Σ_i λ̂_i·mean(c_i·ℓ̄) = Σ_i µ·∇C_i / (k·max(−Ĉ_i, µ²)), with ∇C_i the REINFORCE mean."""
    g = torch.Generator().manual_seed(5)
    V, B, T, k, mu = 5, 6, 7, 3, 0.05
    params = [torch.randn(V, 4, generator=g, dtype=F64, requires_grad=True),  # embedding
              torch.randn(4, V, generator=g, dtype=F64, requires_grad=True)]  # output layer
    tokens = torch.randint(0, V, (B, T), generator=g)
    start = torch.randint(1, 4, (B, 1), generator=g)  # prompt lengths 1..3
    stop = start + torch.randint(1, T - 3, (B, 1), generator=g)
    pos = torch.arange(T)
    mask = (pos >= start) & (pos < stop)
    c = torch.randn(B, k, generator=g, dtype=F64, requires_grad=True)
    # violated, in the relaxed zone, inactive
    C_hat = torch.tensor([0.2, -(mu**2) / 3, -0.4], dtype=F64)

    logp = logp_norm(params[0][tokens] @ params[1], tokens, mask)
    surrogate = reinforce_surrogate(logp, c, lambda_hat(C_hat, mu, k))
    grads = torch.autograd.grad(surrogate, params, retain_graph=True)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(k):
        grad_C_i = torch.autograd.grad((c[:, i] * logp).mean(), params, retain_graph=True)
        weight = mu / (k * max(-C_hat[i].item(), mu**2))
        expected = [e + weight * gc for e, gc in zip(expected, grad_C_i)]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)  # λ̂ is float32: rounding 6e-8
    surrogate.backward()
    assert c.grad is None  # c is a constant of the surrogate


class BagPolicy(torch.nn.Module):
    """A tiny autoregressive policy: logits_t = pos_t + Σ_{s ≤ t} emb[token_s] (a causal bag)."""

    def __init__(self, T, V_in, V, generator):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(T, V, generator=generator, dtype=F64))
        self.emb = torch.nn.Parameter(torch.randn(V_in, V, generator=generator, dtype=F64))

    def forward(self, tokens):  # (B, t) -> (B, t, V)
        return self.pos[: tokens.shape[1]] + self.emb[tokens].cumsum(1)


A, B_TOK, EOS, BOS, MAX_LEN = 0, 1, 2, 3, 3  # vocabulary {a, b, EOS}; BOS is the one-token prompt


def all_responses():
    """Every response of at most MAX_LEN tokens: ended by EOS, or cut at MAX_LEN. 15 of them."""
    rows = []
    for n in range(1, MAX_LEN + 1):
        for body in itertools.product((A, B_TOK), repeat=n - 1):
            rows.append(([*body, EOS], n))
    rows += [(list(body), MAX_LEN) for body in itertools.product((A, B_TOK), repeat=MAX_LEN)]
    tokens = torch.tensor([[BOS] + r + [EOS] * (MAX_LEN - len(r)) for r, _ in rows])  # (15, 4)
    lengths = torch.tensor([n for _, n in rows])
    mask = torch.arange(MAX_LEN + 1) <= lengths[:, None]
    mask[:, 0] = False
    return tokens, mask


def sample_responses(model, n, generator):
    tokens = torch.full((n, 1), BOS)
    done = torch.zeros(n, dtype=torch.bool)
    mask = [done.clone()]  # the prompt is never scored
    with torch.no_grad():
        for _ in range(MAX_LEN):
            probs = torch.softmax(model(tokens)[:, -1], -1)  # (n, V)
            y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            y = torch.where(done, EOS, y)  # padding after the end
            mask.append(~done)
            done = done | (y == EOS)
            tokens = torch.cat([tokens, y[:, None]], 1)
    return tokens, torch.stack(mask, 1)


def cost(tokens, mask):
    """An arbitrary c(y): +1 per a, −0.5 per b, +0.3 per token (EOS included)."""
    resp = torch.where(mask, tokens, -1)
    return ((resp == A).sum(1) - 0.5 * (resp == B_TOK).sum(1) + 0.3 * mask.sum(1)).to(F64)


def test_reinforce_is_unbiased_on_an_enumerable_policy():
    g = torch.Generator().manual_seed(SEED)
    model = BagPolicy(MAX_LEN + 1, 4, 3, g)
    params = list(model.parameters())

    def grad(f):  # ∇_θ f, flattened over all parameters
        return torch.cat([g.flatten() for g in torch.autograd.grad(f, params, retain_graph=True)])

    tokens, mask = all_responses()
    lbar = logp_norm(model(tokens), tokens, mask)  # (15,)
    length = mask.sum(1)
    log_pi = lbar * length
    pi = log_pi.exp()
    c = cost(tokens, mask)
    # the 15 probabilities sum to 1 only because the EOS decision is scored
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)

    true_grad = grad((pi * c).sum())  # ∇E[c]
    score = grad((pi.detach() * c * log_pi).sum())  # E[c·∇log π], Eq. 12
    normed = grad((pi.detach() * c * lbar).sum())  # E[c·∇ℓ̄], what the surrogate estimates
    per_token = grad((pi * c / length).sum())  # ∇E[c/|y|]
    # exact identities, float64
    torch.testing.assert_close(score, true_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(normed, per_token, rtol=1e-10, atol=1e-12)
    # normalising by |y| changes the direction
    assert (normed - true_grad).norm() > 0.1 * true_grad.norm()

    # Monte Carlo through the code path of a constraint step, against E[c·∇ℓ̄]
    n = 20_000
    s_tokens, s_mask = sample_responses(model, n, g)
    s_lbar = logp_norm(model(s_tokens), s_tokens, s_mask)
    surrogate = reinforce_surrogate(s_lbar, cost(s_tokens, s_mask)[:, None],
                                    torch.ones(1, dtype=F64))
    mc = grad(surrogate)
    per_sample = torch.stack([grad(c[j] * lbar[j]) for j in range(len(c))])  # (15, P)
    var = (pi.detach()[:, None] * per_sample**2).sum(0) - normed**2
    se = (var.clamp(min=0) / n).sqrt()
    # 5 standard errors per coordinate: P(any of 24 coordinates fails) ≈ 24·6e-7
    assert ((mc - normed).abs() <= 5 * se + 1e-12).all(), ((mc - normed) / se)
    assert ((mc - true_grad).abs() > 5 * se).any()  # and it is not an estimate of ∇E[c] (z ≈ 125)


def enumerated_policy():
    """The toy policy's ∇ (of a scalar, flattened over its parameters), its 15 responses and their
    ℓ̄ (15,)."""
    g = torch.Generator().manual_seed(SEED)
    model = BagPolicy(MAX_LEN + 1, 4, 3, g)
    params = list(model.parameters())

    def grad(f):
        return torch.cat([g.flatten() for g in torch.autograd.grad(f, params, retain_graph=True)])

    tokens, mask = all_responses()
    return grad, tokens, mask, logp_norm(model(tokens), tokens, mask)


def test_loo_baseline_keeps_eq12_and_the_plain_one_pushes_on_length():
    """--baseline=loo against Eq. 12 by exact enumeration: every batch of 3 responses drawn from the
    15 of the toy policy, weighted by its probability (3,375 batches). With c' = l3m.loo_baseline(c,
    |y|) the expected step mean_b c'_b·∇ℓ̄_b is E[c·∇ℓ̄], Eq. 12's with ℓ̄, to float64 rounding. The
    plain leave-one-out baseline, c_b − mean_{j≠b} c_j, is off by exactly −C·∇E[1/|y|]. The variance
    ratio (total variance of the step, exact) is printed; on this cost the baseline lowers it."""
    grad, tokens, mask, lbar = enumerated_policy()
    n = mask.sum(1).to(F64)
    pi = (lbar * n).exp().detach()
    c = cost(tokens, mask)
    d_lbar = torch.stack([grad(lbar[j]) for j in range(15)])  # (15, P): ∇ℓ̄ per response
    C = (pi * c).sum()
    d_inv_len = grad(((lbar * n).exp() / n).sum())  # ∇E[1/|y|]
    eq12 = (pi[:, None] * c[:, None] * d_lbar).sum(0)  # E[c·∇ℓ̄]

    steps = {"plain": [], "loo": [], "rloo": []}
    weights = []
    for batch in itertools.product(range(15), repeat=3):
        b = list(batch)
        weights.append(pi[b].prod())
        cb = c[b]
        shifted = {"plain": cb, "loo": loo_baseline(cb[:, None], n[b])[:, 0],
                   "rloo": cb - (cb.sum() - cb) / 2}
        for name, cost_b in shifted.items():
            steps[name].append((cost_b[:, None] * d_lbar[b]).mean(0))
    w = torch.stack(weights)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    mean = {k: (w[:, None] * torch.stack(v)).sum(0) for k, v in steps.items()}
    var = {k: (w * (torch.stack(v) - mean[k]).pow(2).sum(1)).sum().item() for k, v in steps.items()}
    torch.testing.assert_close(mean["plain"], eq12, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean["loo"], eq12, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean["rloo"], eq12 - C * d_inv_len, rtol=1e-10, atol=1e-12)
    assert (C * d_inv_len).norm() > 0.1 * eq12.norm()  # the plain baseline's bias is not small here
    print(f"variance of the step, batch 3: loo / none {var['loo'] / var['plain']:.3f}, "
          f"plain leave-one-out / none {var['rloo'] / var['plain']:.3f}")
    assert var["loo"] < var["plain"]


def test_sum_score_steps_along_grad_C_with_and_without_its_baseline():
    """--score=sum by exact enumeration on the toy policy: weighting c by l3m.sequence_score(ℓ̄,
    |y|, "sum") makes the expected step ∇C = ∇E[c] (where the default "mean" gives ∇E[c/|y|]), and
    so does a batch of 3 with the leave-one-out baseline at count 1, as constraint_step passes it
    (3,375 batches). Catches a sum score that is still normalised, and a baseline scaled by |y|
    with it (biased)."""
    grad, tokens, mask, lbar = enumerated_policy()
    n = mask.sum(1)
    pi = (lbar * n).exp()
    c = 0.9 - (n - 1 <= 2).to(F64)  # P[|y| ≤ 2] ≥ 0.9 as rewards.py writes it: c = b − 1{…}
    true_grad = grad((pi * c).sum())  # ∇C
    d_score = {k: torch.stack([grad(l3m.sequence_score(lbar, n, k)[j]) for j in range(15)])
               for k in ("mean", "sum")}
    w = pi.detach()
    expected = {k: (w[:, None] * c[:, None] * d).sum(0) for k, d in d_score.items()}
    torch.testing.assert_close(expected["sum"], true_grad, rtol=1e-10, atol=1e-12)
    assert (expected["mean"] - true_grad).norm() > 0.1 * true_grad.norm()

    steps, biased, weights = [], [], []
    for batch in itertools.product(range(15), repeat=3):
        b = list(batch)
        weights.append(w[b].prod())
        cb = c[b][:, None]
        steps.append((loo_baseline(cb, torch.ones(3, dtype=F64)) * d_score["sum"][b]).mean(0))
        biased.append((loo_baseline(cb, n[b]) * d_score["sum"][b]).mean(0))
    weights = torch.stack(weights)[:, None]
    torch.testing.assert_close((weights * torch.stack(steps)).sum(0), true_grad, rtol=1e-10,
                               atol=1e-12)
    assert ((weights * torch.stack(biased)).sum(0) - true_grad).norm() > 0.1 * true_grad.norm()


# ----------------------------------------------------------------------------- toy
# constrained problems

def run_categorical(p, c_of, k, theta0, method="l3m", eta_lam=None, steps=4000, lr=0.1,
                    batch_task=64, batch_con=1024, seed=0):
    """The procedure on π = softmax(θ) over K outcomes, each a one-token response (ℓ̄ = log π_y).

    Heads: a task step on a batch drawn from p (loss −mean log π_y). Tails: sample from π,
    c = c_of(y), update Ĉ, step on the surrogate. µ_t = mu_at(t, steps − 1), SGD with a cosine
    learning rate, each kind of step clipped to norm 1. Returns per-step records.
    """
    from train import coin
    g, coin_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mult = Multipliers(k, method, eta_lam)
    rec = {"pi": [], "task": [], "lam": [], "lr": [], "clip": []}
    with one_thread():
        for step in range(steps):
            mu = mu_at(step, steps - 1)
            logp = torch.log_softmax(theta, 0)  # (K,)
            is_task = coin(coin_gen)
            if is_task:
                y = torch.multinomial(p, batch_task, replacement=True, generator=g)
                loss, lam = task_loss(logp[y]), torch.zeros(k)
            else:
                y = torch.multinomial(logp.detach().exp(), batch_con, replacement=True, generator=g)
                c = c_of(y)  # (B, k)
                mult.observe(c)
                lam = mult.lam(mu)
                loss = reinforce_surrogate(logp[y], c, lam)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([theta], 1.0).item()
            rec["lr"].append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
            rec["pi"].append(torch.softmax(theta.detach(), 0).double().numpy())
            rec["task"].append(is_task)
            rec["lam"].append(lam.double().numpy())
            rec["clip"].append(min(1.0, 1.0 / (norm + 1e-6)))  # the factor clip_grad_norm_ applied
    return {key: np.array(v) for key, v in rec.items()}


def kkt_point(p, r_mat, b, active):
    """KKT point of  min −Σ p_j log π_j  s.t.  E_π[R_i] ≥ b_i  with one active constraint.

    Stationarity on the simplex: π_j = p_j / (ν − Σ_i λ_i R_ij), ν fixed by Σ π = 1 (a 1-D root
    in ν given λ); λ_active fixed by E_π[R_active] = b_active (a 1-D root, E_π[R] grows with λ).
    """

    def pi_of(lam):
        a = r_mat.T @ lam  # (K,)
        lo, hi = a.max() + 1e-15, a.max() + 1e3  # Σ p/(ν − a) falls from +∞ to ≈ 0 on (max a, ∞)
        for _ in range(200):
            nu = (lo + hi) / 2
            lo, hi = (nu, hi) if (p / (nu - a)).sum() > 1 else (lo, nu)
        return p / (hi - a)

    lam, lo, hi = np.zeros(len(b)), 0.0, 1e3
    for _ in range(200):
        lam[active] = (lo + hi) / 2
        lo, hi = (lam[active], hi) if pi_of(lam) @ r_mat[active] < b[active] else (lo, lam[active])
    lam[active] = hi
    return pi_of(lam), lam


def tv(a, b):
    return 0.5 * np.abs(a - b).sum()


# Task: cross-entropy to P. Constraint 1 (E[R_1] ≥ 1) is active at the optimum; constraint 2
# (E[R_2] ≥ 0.25) is violated at the start θ = log P but satisfied with slack at the optimum.
P_TOY = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
R_TOY = np.array([[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]], dtype=float)
BOUND = np.array([1.0, 0.25])
ALPHA, BATCH_CON = 0.1, 1024


def categorical_costs(y):  # c = b − r, (B, 2)
    rewards = torch.tensor(R_TOY, dtype=torch.float32)[:, y].T
    return torch.tensor(BOUND, dtype=torch.float32) - rewards


def run_toy(method, eta_lam, seed):
    theta0 = torch.log(torch.tensor(P_TOY, dtype=torch.float32))  # start at the task's own optimum
    return run_categorical(torch.tensor(P_TOY), categorical_costs, 2, theta0, method, eta_lam,
                           batch_con=BATCH_CON, seed=seed)


def test_l3m_reaches_the_kkt_point():
    pi_star, lam_star = kkt_point(P_TOY, R_TOY, BOUND, active=0)
    # one active, one inactive with slack
    assert lam_star[0] > 0.5 and R_TOY[1] @ pi_star - BOUND[1] > 0.1
    assert (R_TOY @ P_TOY < BOUND).all()  # the start violates both

    rec = run_toy("l3m", None, SEED)
    pi_end = rec["pi"][-400:].mean(0)  # the last 10 % of the run: µ < 4e-6, lr ≈ 0

    # The constraint step fires whenever Ĉ_1 ≥ −µ², so C_1 is held where Ĉ_1's noise crosses 0:
    # a few σ_Ĉ from 0, σ_Ĉ = σ_c·√(α/((2−α)B)), the EMA's stationary noise (0.006 here).
    sigma_c = math.sqrt(R_TOY[0] ** 2 @ pi_star - (R_TOY[0] @ pi_star) ** 2)
    sigma_C_hat = sigma_c * math.sqrt(ALPHA / ((2 - ALPHA) * BATCH_CON))
    tol_C = 4 * sigma_C_hat
    # how far 4σ_Ĉ of slack in C_1 moves the optimum: TV to the KKT point with b_1 + 4σ_Ĉ (0.014)
    tol_tv = tv(kkt_point(P_TOY, R_TOY, BOUND + np.array([tol_C, 0.0]), active=0)[0], pi_star)
    print(f"L3M: TV(π, π*) = {tv(pi_end, pi_star):.4f} (start {tv(P_TOY, pi_star):.3f}, tol "
          f"{tol_tv:.4f}), C_1 = {BOUND[0] - R_TOY[0] @ pi_end:+.4f} (tol {tol_C:.4f}), C_2 = "
          f"{BOUND[1] - R_TOY[1] @ pi_end:+.4f}")
    assert tv(pi_end, pi_star) < tol_tv
    assert abs(BOUND[0] - R_TOY[0] @ pi_end) < tol_C

    # Complementary slackness: the inactive constraint's λ̂_2 = µ/(k·(−Ĉ_2)) → 0. It was 1/(kµ_0)
    # ≥ 0.5 on the first constraint step (violated), and is µ_T/(2·0.115) ≈ 4e-6 at the end.
    con = ~rec["task"]
    assert rec["lam"][con][0, 1] >= 0.5
    assert BOUND[1] - R_TOY[1] @ pi_end < -0.1
    assert rec["lam"][con][-1, 1] < 1e-5

    # λ̂ acts as λ*. Once µ/(kλ*) is below Ĉ's noise (µ < ~1e-2), λ̂_1 is either ≈ 0 or 1/(kµ)
    # (a bang-bang control of C_1 around 0) and the clip sets the size of the step: the
    # multiplier that acts is λ̂_1·clip. Stationarity of SGD over the second half of the run,
    #   Σ_task lr·clip·∇L + Σ_con lr·clip·λ̂_1·∇C_1 ≈ 0   with   ∇L(π*) = −λ*·∇C_1(π*),
    # gives λ* ≈ Σ_con lr·clip·λ̂_1 / Σ_task lr·clip. Seeds 0–5 give +0.7 %..+2.8 % (a small
    # bias: C_1 sits slightly on the satisfied side); 10 % allows for that and for the noise.
    half = np.arange(len(con)) >= len(con) // 2
    w = rec["lr"] * rec["clip"]
    lam_acting = (w * rec["lam"][:, 0])[con & half].sum() / w[~con & half].sum()
    print(f"L3M: acting λ_1 = {lam_acting:.4f}, λ*_1 = {lam_star[0]:.4f}; "
          f"last λ̂_2 = {rec['lam'][con][-1, 1]:.2e}")
    assert lam_acting == pytest.approx(lam_star[0], rel=0.10)


def test_mm_needs_a_well_chosen_eta():
    """The minimax Lagrangian reaches π* for η_λ = 0.005 and misbehaves on either side of it."""
    pi_star, lam_star = kkt_point(P_TOY, R_TOY, BOUND, active=0)
    summary = {}
    for eta in (0.005, 0.001, 3.0):
        rec = run_toy("mm", eta, SEED)
        tail = slice(int(0.8 * len(rec["pi"])), None)  # the last 20 % of the run
        lam_tail = rec["lam"][tail][~rec["task"][tail], 0]
        pi_end = rec["pi"][tail].mean(0)
        summary[eta] = (tv(pi_end, pi_star), BOUND[0] - R_TOY[0] @ pi_end, lam_tail.mean(),
                        lam_tail.std())
        print(f"MM η_λ = {eta}: TV {summary[eta][0]:.4f}, C_1 {summary[eta][1]:+.4f}, "
              f"λ_1 {summary[eta][2]:.3f} ± {summary[eta][3]:.3f} (λ* {lam_star[0]:.3f})")
    # Good: λ's time constant 1/(η·Var_π R_1) ≈ 270 constraint steps is slower than θ's and
    # much shorter than the run. Seeds 0–5: TV 0.009–0.029, λ within −5 %..+13 % of λ*, its
    # std ≤ 0.03. MM's λ lags when the learning rate decays, so these bounds are wider than
    # L3M's (TV ≤ 0.007 on the same seeds).
    tv_good, _, lam_good, lam_good_std = summary[0.005]
    assert tv_good < 0.04
    assert lam_good == pytest.approx(lam_star[0], rel=0.2)
    assert lam_good_std < 0.05
    # η_λ too small: λ is still climbing at the end, C_1 stays violated (seeds 0–5: ≥ 0.15)
    # and π ends 3–11× farther from π* than with the good η_λ.
    tv_slow, C_slow, _, _ = summary[0.001]
    assert C_slow > 0.1 and tv_slow > 2 * tv_good
    # η_λ too large: λ swings with every noisy Ĉ (seeds 0–5: std 0.47–1.14, ≥ 20× the good η_λ's).
    assert summary[3.0][3] > 0.3 and summary[3.0][3] > 5 * lam_good_std


def test_chance_constraint_with_indicator_rewards():
    """P[r ≥ b] ≥ 1 − ε as the average constraint E[1{r ≥ b}] ≥ 1 − ε (§4.1)."""
    p = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    r, b, eps = torch.arange(6.0), 3.0, 0.2  # P_p[r ≥ 3] = 0.25; require at least 0.8

    def costs(y):
        indicator, threshold = chance(lambda y: r[y], b, eps)
        return (threshold - indicator(y))[:, None]  # (B, 1)

    good = (r >= b).double().numpy()
    pi_star, _ = kkt_point(p, good[None], np.array([1 - eps]), active=0)
    theta0 = torch.log(torch.tensor(p, dtype=torch.float32))
    rec = run_categorical(torch.tensor(p), costs, 1, theta0, seed=SEED)
    pi_end = rec["pi"][-400:].mean(0)
    prob = good @ pi_end
    print(f"chance: P[r ≥ b] = {prob:.4f} (start 0.25, target 0.8), TV(π, π*) = "
          f"{tv(pi_end, pi_star):.4f}")
    # noise floor as above: σ_c = √(0.8·0.2) = 0.4, σ_Ĉ = 0.4·√(0.1/(1.9·1024)) = 0.0029; allow 4σ_Ĉ
    assert prob == pytest.approx(0.8, abs=0.012)
    # π* scales the p-mass of {r ≥ b} up to 0.8 and the rest down to 0.2. TV counts the mass
    # between the two sets (≤ 0.012 as above) plus the proportions within each, which only the
    # noisy 64-sample task steps restore; seeds 0–5 give TV 0.004–0.008.
    assert tv(pi_end, pi_star) < 0.02


# Length band: a policy over responses "a a … a EOS" of at most L_MAX tokens; its parameters
# are the logits of stopping at each position t (θ_t for EOS, 0 for a).
L_MAX, TOK_A, TOK_EOS = 20, 0, 1


def band_logits(theta, B):  # (L_MAX,) -> (B, L_MAX + 1, 2); the last position scores nothing
    z = torch.stack([torch.zeros(L_MAX), theta], -1)
    return torch.cat([z, torch.zeros(1, 2)])[None].expand(B, -1, -1)


def band_batch(lengths, ended):
    """tokens (B, L_MAX + 1): a one-token prompt, then a…a and EOS if the response ended."""
    pos = torch.arange(1, L_MAX + 1)
    resp = torch.where((pos == lengths[:, None]) & ended[:, None], TOK_EOS, TOK_A)
    resp = torch.where(pos > lengths[:, None], TOK_EOS, resp)  # padding
    tokens = torch.cat([torch.full((len(lengths), 1), TOK_A), resp], 1)
    mask = torch.cat([torch.zeros(len(lengths), 1, dtype=torch.bool), pos <= lengths[:, None]], 1)
    return tokens, mask


def band_sample(theta, B, g):
    stop = torch.rand(B, L_MAX, generator=g) < torch.sigmoid(theta.detach())  # (B, L_MAX)
    ended = stop.any(1)
    lengths = torch.where(ended, stop.float().argmax(1) + 1, L_MAX)  # cut at L_MAX without EOS
    return (*band_batch(lengths, ended), lengths)


def length_distribution(theta):
    s = torch.sigmoid(theta.detach()).double()
    survive = torch.cat([torch.ones(1, dtype=F64), (1 - s[:-1]).cumprod(0)])  # P(|y| ≥ t)
    q = survive * s
    q[-1] = survive[-1]
    return q  # (L_MAX,), P(|y| = t)


def mean_length(theta):
    return (length_distribution(theta) * torch.arange(1, L_MAX + 1)).sum().item()


@pytest.mark.parametrize("side, data_mean, data_sd", [("above", 12.0, 3.0), ("below", 2.0, 1.5)])
def test_length_band_from_either_side(side, data_mean, data_sd):
    """r_1 = |y| − l_low, r_2 = l_high − |y|, b = 0 (§6.2): the mean length ends inside the band."""
    l_low, l_high, steps = 5.0, 8.0, 2000
    t = torch.arange(1, L_MAX + 1, dtype=F64)
    p_data = torch.exp(-((t - data_mean) ** 2) / (2 * data_sd**2))
    p_data[-1] = 0  # every data response ends with EOS
    p_data /= p_data.sum()
    # The task loss is length-normalised: data responses of length n weigh 1/n, so the task
    # alone converges to q ∝ p_data(n)/n (mean = harmonic mean of the data lengths). Start there.
    q = p_data / t / (p_data / t).sum()
    survive = q.flip(0).cumsum(0).flip(0)
    hazard = torch.where(survive > 0, q / survive.clamp(min=1e-300), 1.0).clamp(1e-4, 1 - 1e-4)
    theta = torch.log(hazard / (1 - hazard)).float().requires_grad_(True)
    start = mean_length(theta)
    assert start > l_high if side == "above" else start < l_low

    from train import coin
    g, coin_gen = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.SGD([theta], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mult = Multipliers(2)
    with one_thread():
        for step in range(steps):
            mu = mu_at(step, steps - 1)
            if coin(coin_gen):
                lengths = torch.multinomial(p_data.float(), 64, replacement=True, generator=g) + 1
                tokens, mask = band_batch(lengths, torch.ones_like(lengths, dtype=torch.bool))
                loss = task_loss(logp_norm(band_logits(theta, 64), tokens, mask))
            else:
                tokens, mask, lengths = band_sample(theta, 256, g)
                c = torch.stack([l_low - lengths, lengths - l_high], 1).float()  # (B, 2), c = b − r
                mult.observe(c)
                loss = reinforce_surrogate(logp_norm(band_logits(theta, 256), tokens, mask), c,
                                           mult.lam(mu))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([theta], 1.0)
            opt.step()
            sched.step()
    end = mean_length(theta)
    lam_end = mult.lam(mu_at(steps - 1, steps - 1))
    print(f"band [{l_low}, {l_high}] from {side}: mean length {start:.2f} -> {end:.3f}, "
          f"λ̂ at the end {lam_end.tolist()}")
    assert l_low <= end <= l_high
    # The task keeps pulling toward its side, so the constraint on that side is the active one:
    # the mean stays within a quarter of the band of that boundary (seeds 0–5: 0.01–0.37 from it).
    near = l_high if side == "above" else l_low
    assert abs(end - near) < (l_high - l_low) / 4
    far = 0 if side == "above" else 1
    assert lam_end[far] < 1e-5  # the other side's constraint is inactive: λ̂ → 0


# -----------------------------------------------------------------------------
# rewards.py: length rewards, Bradley–Terry reward models, constraints from text


def tiny_lm(vocab_size, seed=0, dim=64):
    args = M.ModelArgs(dim=dim, n_layers=2, n_heads=4, vocab_size=vocab_size, multiple_of=32,
                       max_seq_len=256)
    return M.Transformer(args).init_weights(seed)


def test_length_reward_and_costs(tok):
    prompts = [[1, 5], [1, 6, 7]]
    responses = [[8, 9, tok.eos_id], [10, 11, 12, 13]]  # the second hit max_new_tokens: no EOS
    s = R.Samples.from_generate(prompts, responses, [True, False], tok)
    assert R.length_reward(s).tolist() == [2.0, 4.0]  # |y| excludes the EOS
    low, high = R.parse_constraints(["length>=3", "length<=3.5"], {"length": R.length_reward})
    y = torch.tensor([2.0, 4.0])
    assert torch.equal(low.cost(s), 3 - y)  # = b₁ − r₁ with §6.2's r₁ = |y| − l_low, b₁ = 0
    assert torch.equal(high.cost(s), y - 3.5)  # = b₂ − r₂ with r₂ = l_high − |y|, b₂ = 0
    assert torch.equal(R.costs([low, high], s), torch.stack([3 - y, y - 3.5], 1))  # (B, k)
    assert R.costs([], s).shape == (2, 0)
    assert s.response_texts == [tok.decode([8, 9]), tok.decode([10, 11, 12, 13])]
    # a cut answer reaches no length on ended_length: P[|y| ≥ 2 and ended] is 1 and 0, not 1 and 1
    assert R.ended_length(s).tolist() == [2.0, 0.0]
    chance = R.parse_constraint("P[ended_length>=2]>=0.6", {"ended_length": R.ended_length})
    assert torch.equal(chance.cost(s), 0.6 - torch.tensor([1.0, 0.0]))  # b − 1{r ≥ 2}


def test_bradley_terry_loss_and_accuracy():
    r_plus, r_minus = torch.tensor([0.0, 2.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    expected = -torch.log(torch.sigmoid(r_plus - r_minus)).mean()
    assert torch.allclose(R.bradley_terry_loss(r_plus, r_minus), expected)
    assert R.pairwise_accuracy(r_plus, r_minus) == pytest.approx(1 / 3)  # the tie counts as wrong


def test_learned_reward_is_logp_norm(tok):
    model = tiny_lm(tok.vocab_size, seed=1)
    prompts = [tok.encode("Human: Hi.\n\nAssistant:"), tok.encode("Human: Tell me about the "
                                                                  "owl.\n\nAssistant:")]
    responses = [tok.encode("Hello.", bos=False, eos=True), tok.encode("It hoots", bos=False)]
    s = R.Samples.from_generate(prompts, responses, [True, False], tok)
    rm = R.LearnedReward(model, micro_batch=1)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    r = rm(s)
    assert r.shape == (2,) and r.dtype == torch.float32
    for i in range(2):
        t, m = D.response_batch([prompts[i]], [responses[i]])
        with torch.no_grad():
            assert torch.allclose(r[i], l3m.logp_norm(model(t), t, m)[0], atol=1e-5)


@torch.no_grad()
def held_out_accuracy(model, examples, batch_size=32):
    """Share of pairs a reward model ranks right, r(y⁺|x) > r(y⁻|x), in eval mode."""
    model.eval()
    rewards = [R.preference_rewards(model, examples[i:i + batch_size])
               for i in range(0, len(examples), batch_size)]
    model.train()
    return R.pairwise_accuracy(torch.cat([p for p, _ in rewards]),
                               torch.cat([m for _, m in rewards]))


def test_bradley_terry_reward_model_learns_demo_preferences(demo, tok):
    """A random-init 2-layer model, 30 Bradley–Terry steps of 16 pairs: ≥ 90 % held-out
    accuracy on the cautious preferences (measured: 99.5 %; the informative ones are learnt
    through train.py below)."""
    with one_thread():
        torch.manual_seed(0)
        start = time.time()
        train = D.read_hh(demo.cautious_train, tok).examples
        test = D.read_hh(demo.cautious_test, tok).examples
        model = tiny_lm(tok.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        before = held_out_accuracy(model, test)
        for _ in range(30):
            idx = torch.randint(len(train), (16,), generator=gen).tolist()
            loss = R.bradley_terry_loss(*R.preference_rewards(model, [train[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = held_out_accuracy(model, test)
        print(f"\nBradley–Terry cautious: held-out accuracy {before:.3f} -> {acc:.3f} "
              f"({len(test)} pairs, {time.time() - start:.1f} s)")
        assert acc >= 0.9


# -----------------------------------------------------------------------------
# Constraints on the command line


def test_verdict_reads_C_against_its_standard_error():
    assert [R.verdict(C, 0.5) for C in (-0.1, 0.0, 1e-9, 1.0, 1.0001)] == \
        ["satisfied", "satisfied", "within noise", "within noise", "violated"]
    # A model exactly on its threshold: its test estimate C ~ N(0, se²) reads satisfied half the
    # time and violated with probability 1 − Φ(2) = 0.0228. 40,000 draws: binomial std ≤ 0.0025 for
    # either share.
    C = np.random.default_rng(0).normal(0.0, 0.3, 40_000)
    reads = [R.verdict(float(x), 0.3) for x in C]
    assert reads.count("satisfied") / len(C) == pytest.approx(0.5, abs=0.01)
    assert reads.count("violated") / len(C) == pytest.approx(0.0228, abs=0.003)


def test_parse_constraints():
    length = R.length_reward
    helpful = lambda s: torch.tensor([2.0, 3.5])
    rewards = {"length": length, "helpful": helpful}
    c = R.parse_constraint(" helpful >= 3 ", rewards)
    assert (c.name, c.b) == ("helpful >= 3", 3.0) and c.reward is helpful
    c = R.parse_constraint("helpful<=-1.5e0", rewards)
    assert c.b == 1.5 and c.reward(None).tolist() == [-2.0, -3.5]
    c = R.parse_constraint("P[helpful>=3]>=0.9", rewards)
    assert c.b == 0.9 and c.reward(None).tolist() == [0.0, 1.0]
    assert c.cost(None).tolist() == pytest.approx([0.9, -0.1])
    c = R.parse_constraint("P[ helpful <= 3 ] >= .5", rewards)
    assert c.reward(None).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("text, message", [
    ("length=>50", r"use >= or <="),
    ("length>50", r"use >= or <="),
    ("length==50", r"use >= or <="),
    ("length>=fifty", r"cannot read 'length>=fifty'"),
    ("helpfulness>=3", r"unknown reward 'helpfulness'; known rewards: helpful, length"),
    ("P[helpful>=3]>=1.5", r"a probability must lie in \(0, 1\]"),
    ("P[helpful>=3]<=0.1", r"chance constraint reads P\[NAME>=NUMBER\]>=PROB"),
    ("", r"expected NAME>=NUMBER, NAME<=NUMBER, P\[NAME>=NUMBER\]>=PROB"),
])
def test_parse_constraint_errors(text, message):
    with pytest.raises(R.ConstraintError, match=message):
        R.parse_constraint(text, {"length": R.length_reward, "helpful": R.length_reward})


def test_duplicate_constraints_rejected():
    with pytest.raises(R.ConstraintError, match="given twice"):
        R.parse_constraints(["length>=5", "length>=5"], {"length": R.length_reward})


# -----------------------------------------------------------------------------
# data.py (print the measured numbers with `pytest -s`)


def write_jsonl(path, records):
    """records: dicts, or str for a raw (malformed) line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def text(tok, ids):
    return tok.decode([int(i) for i in ids])


# -----------------------------------------------------------------------------
# Chat template and readers

DIALOGUE = ["Tell me about the owl.", "The owl lives in old forests.", "And what about the fox?",
            "The fox is usually red with a white tail tip.", "Thanks!", "You are welcome."]


def test_template_and_exact_boundary(tok):
    dialogue = [("user", "Hi there."), ("assistant", "Hello."), ("user", "Tell me about the owl.")]
    prompt = D.render_dialogue(dialogue) + "\n\nAssistant:"
    assert prompt == ("Human: Hi there.\n\nAssistant: Hello.\n\nHuman: Tell me about the owl.\n\n"
                      "Assistant:")
    p = D.encode_prompt(tok, dialogue)
    r = D.encode_response(tok, " The owl lives in old forests.\n")
    assert p.tolist() == tok.encode(prompt, bos=True)
    assert p[0] == tok.bos_id and r[-1] == tok.eos_id and tok.eos_id not in r[:-1]
    # prompt + response decode to the whole exchange: sentencepiece's leading space is the only glue
    assert text(tok, list(p) + list(r)) == prompt + " The owl lives in old forests."
    odd = "Ünïcode ✓\n\n  two spaces\ttab"  # unseen characters go through byte fallback
    assert tok.decode(tok.encode(odd)) == odd
    with pytest.raises(ValueError, match="user turn"):
        D.encode_prompt(tok, [("user", "a"), ("assistant", "b")])
    with pytest.raises(ValueError, match="no system prompt"):
        D.encode_prompt(tok, dialogue, "plain", system="Be brief.")


@pytest.mark.parametrize("system", ["", "Be brief."])
def test_llama2_chat_template_token_for_token(tok, system):
    """LLaMA-2-chat's format as Meta's chat_completion builds it: every finished exchange is BOS,
    the text "[INST] u [/INST] a " and EOS (ids, not text); the open turn is BOS "[INST] u [/INST]";
    a system prompt sits inside the first [INST] between <<SYS>> tags. The answer, tokenised apart,
    continues the prompt exactly as the whole exchange is tokenised in training."""
    dialogue = [("user", "Hi there. "), ("assistant", " Hello."),
                ("user", "Tell me about the owl.")]
    first = "<<SYS>>\nBe brief.\n<</SYS>>\n\nHi there." if system else "Hi there."
    expected = ([tok.bos_id] + tok.sp.encode(f"[INST] {first} [/INST] Hello. ") + [tok.eos_id]
                + [tok.bos_id] + tok.sp.encode("[INST] Tell me about the owl. [/INST]"))
    p = D.encode_prompt(tok, dialogue, "llama2", system)
    assert p.tolist() == expected and p.dtype == np.int32
    r = D.encode_response(tok, "The owl lives in old forests.", "llama2")
    whole = tok.sp.encode("[INST] Tell me about the owl. [/INST] The owl lives in old forests. ")
    assert tok.sp.encode("[INST] Tell me about the owl. "
                         "[/INST]") + r.tolist() == whole + [tok.eos_id]
    with pytest.raises(ValueError, match="user turn"):
        D.encode_prompt(tok, dialogue[:2], "llama2")


@pytest.fixture
def chatml_tok(demo, tmp_path):
    """The demo tokenizer with ChatML's markers added after its V pieces: <|im_end|> = V,
    <|im_start|> = V + 1."""
    V = M.Tokenizer(str(demo.tokenizer)).vocab_size
    shutil.copyfile(demo.tokenizer, tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": V,
                                                            "<|im_start|>": V + 1}))
    return M.Tokenizer(str(tmp_path / "tokenizer.model"))


def test_added_tokens_split_the_text(chatml_tok, tmp_path):
    t, V = chatml_tok, chatml_tok.sp.vocab_size()
    assert t.vocab_size == V + 2
    text = "<|im_start|>user\nHi<|im_end|>\n"
    assert t.encode(text) == [t.bos_id, V + 1] + t.sp.encode("user\nHi") + [V] + t.sp.encode("\n")
    assert t.decode(t.encode(text, eos=True)) == text
    # inside the vocabulary
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 5}))
    with pytest.raises(M.CheckpointError, match="added token ids must follow the"):
        M.Tokenizer(str(tmp_path / "tokenizer.model"))


@pytest.mark.parametrize("system", ["", "Be brief."])
def test_chatml_template_token_for_token(tok, chatml_tok, system):
    """ChatML as one string, <|im_start|>/<|im_end|> as their ids and the text between them
    tokenised piece by piece; the answer ends with <|im_end|>, the stop token, and continues the
    prompt's last piece exactly."""
    t, V = chatml_tok, chatml_tok.sp.vocab_size()
    S, E, nl = [V + 1], [V], t.sp.encode("\n")
    dialogue = [("user", "Hi there. "), ("assistant", " Hello."),
                ("user", "Tell me about the owl.")]
    turn = lambda text: S + t.sp.encode(text) + E + nl
    expected = [t.bos_id] + (turn("system\nBe brief.") if system else []) + turn("user\nHi there.")
    expected += turn("assistant\nHello.") + turn("user\nTell me about the owl.")
    expected += S + t.sp.encode("assistant\n")
    assert D.encode_prompt(t, dialogue, "chatml", system).tolist() == expected
    r = D.encode_response(t, "The owl lives in old forests.", "chatml")
    whole = t.sp.encode("assistant\nThe owl lives in old forests.") + E
    assert t.sp.encode("assistant\n") + r.tolist() == whole
    assert D.stop_id(t, "chatml") == V
    assert D.stop_id(t, "llama2") == D.stop_id(t, "plain") == t.eos_id
    with pytest.raises(D.DataError, match="needs <\\|im_start\\|> and <\\|im_end\\|>"):
        D.encode_prompt(tok, dialogue, "chatml")  # the demo tokenizer has no markers
    with pytest.raises(D.DataError, match="needs <\\|im_start\\|>"):
        D.read_ultrachat([], tok, template="chatml")  # at once, not as each line malformed
    import train  # the rollouts stop at <|im_end|>
    seen = []

    def generate(model, prompts, max_new_tokens, stop, *a):
        seen.append(stop)
        return [[5, stop]] * len(prompts), [True] * len(prompts)
    cfg = train.parse_config(["--chat_template=chatml"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "generate", generate)
        samples = train.rollout(None, t, [expected], cfg, None)
    assert seen == [V] and samples.responses == [[5,
                                                  V]] and R.length_reward(samples).tolist() == [1.0]


def test_chat_models_added_tokens_travel_with_the_checkpoint(demo, tmp_path):
    """A Hugging Face chat model's added tokens (tokenizer_config.json's added_tokens_decoder, past
    the sentencepiece vocabulary) reach our folder, load with it, and go out again with export."""
    pytest.importorskip("transformers")
    V = M.Tokenizer(str(demo.tokenizer)).vocab_size
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(demo.tokenizer, src / "tokenizer.model")
    decoder = {"0": {"content": "<unk>"}, str(V): {"content": "<|im_end|>"},
               str(V + 1): {"content": "<|im_start|>"}}
    (src / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    args = tiny_args(vocab_size=V + 2)
    M.save_checkpoint(M.Transformer(args).init_weights(0).state_dict(), str(tmp_path / "ours"),
                      args, str(src / "tokenizer.model"))
    added = {"<|im_end|>": V, "<|im_start|>": V + 1}
    assert json.loads((tmp_path / "ours" / "added_tokens.json").read_text()) == added
    _, t = M.load_model(str(tmp_path / "ours"))
    assert t.added == added and t.vocab_size == V + 2
    M.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "added_tokens.json").read_text()) == added


def test_readers_use_the_chat_template(tok, tmp_path):
    """--chat_template reaches both readers: the same dialogue, read as llama2, gives
    encode_prompt's ids."""
    record = {"data": ["Tell me about the owl.", "It hoots."]}
    read = D.read_ultrachat(write_jsonl(tmp_path / "u.jsonl", [record]), tok, template="llama2",
                            system="Be kind.")
    ex = read.examples[0]
    assert ex.prompt.tolist() == D.encode_prompt(tok, [("user", record["data"][0])], "llama2",
                                                 "Be kind.").tolist()
    assert ex.response.tolist() == D.encode_response(tok, "It hoots.", "llama2").tolist()
    pair = D.read_hh(write_jsonl(tmp_path / "hh.jsonl", [hh([("Human", "Is it?")], "Yes.", "No.")]),
                     tok, template="llama2").examples[0]
    assert pair.prompt.tolist() == D.encode_prompt(tok, [("user", "Is it?")], "llama2").tolist()
    assert pair.rejected.tolist() == D.encode_response(tok, "No.", "llama2").tolist()
    import train  # and train.py's flags reach them
    flags = ["--chat_template=llama2", "--system_prompt=Be kind.", "--val=0", "--test=0"]
    (ex2,), _, _ = train.load_data(train.parse_config([f"--data={tmp_path / 'u.jsonl'}", *flags]),
                                   tok)
    assert ex2.prompt.tolist() == ex.prompt.tolist()
    (pair2,), _, _ = train.load_data(train.parse_config(["--method=reward",
                                                         f"--data={tmp_path / 'hh.jsonl'}",
                                                         *flags]), tok)
    assert pair2.prompt.tolist() == D.encode_prompt(tok, [("user", "Is it?")], "llama2",
                                                    "Be kind.").tolist()


def test_ultrachat_turn_keyed_by_the_dialogue(tok, tmp_path):
    """Which assistant turn a dialogue gives is drawn with (seed, the dialogue's text): both
    UltraChat formats, a gzipped copy, a renamed file and one with its lines reordered give the same
    set of pairs."""
    n = 40
    # 40 different dialogues
    dialogues = [[f"{DIALOGUE[0]} ({i})"] + DIALOGUE[1:] for i in range(n)]
    data_recs = [{"id": str(i), "data": d} for i, d in enumerate(dialogues)]
    msg_recs = [{"messages": [{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                              for j, t in enumerate(d)]} for d in dialogues]
    pairs = lambda r: sorted((a.prompt.tobytes(), a.response.tobytes()) for a in r.examples)
    r1 = D.read_ultrachat(write_jsonl(tmp_path / "u.jsonl", data_recs), tok, seed=3)
    assert len(r1.examples) == n and r1.lines == n
    for other in (write_jsonl(tmp_path / "messages.jsonl", msg_recs),
                  write_jsonl(tmp_path / "u.jsonl.gz", data_recs),
                  write_jsonl(tmp_path / "renamed.jsonl", data_recs[::-1])):
        assert pairs(D.read_ultrachat(other, tok, seed=3)) == pairs(r1), other
    chosen = []
    for e, d in zip(r1.examples, dialogues):
        k = d.index(text(tok, e.response))  # the response is an assistant turn, whole
        assert k % 2 == 1
        before = [("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(d[:k])]
        expected = D.render_dialogue(before) + "\n\nAssistant:"
        assert text(tok, e.prompt) == expected  # the prompt is exactly the dialogue before it
        chosen.append(k)
    # 40 draws of 3 turns: all appear (misses one with prob. < 1e-6)
    assert set(chosen) == {1, 3, 5}
    # the seed matters
    assert pairs(D.read_ultrachat(tmp_path / "u.jsonl", tok, seed=4)) != pairs(r1)


def test_ultrachat_token_limit(tok, tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"id": "0", "data": ["Hi.", "Hello."]},
                                              {"id": "1", "data": ["Hi.", "Hello. " * 50]}])
    r = D.read_ultrachat(path, tok, max_tokens=40)
    assert len(r.examples) == 1 and r.too_long == 1
    assert all(len(e.prompt) + len(e.response) <= 40 for e in r.examples)
    assert "dropped 1 over 40 tokens" in str(r)


MALFORMED = [('{"id": "0", "data": ["Tell me about the owl.", "The owl lives in old forests."]}',
              None), ("this is not json", "not JSON"), ('{"id": "2", "dialogue": ["a", "b"]}',
                                                        "neither 'data' nor 'messages'"),
             ('{"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": '
              '"Hello."}]}', "roles do not alternate"), ('{"id": "4", "data": ["Tell me about the '
                                                         'owl.", "   "]}', "empty turn"),
             ('{"id": "5", "data": ["Only a question?"]}', "no assistant turn"),]


def test_ultrachat_malformed_lines(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in MALFORMED])
    r = D.read_ultrachat(path, tok)
    assert len(r.examples) == 1 and r.lines == len(MALFORMED)
    assert sum(r.malformed.values()) == len(MALFORMED) - 1
    summary = str(r)
    assert "skipped 5 malformed" in summary
    assert "1 not JSON" in summary and "1 empty turn" in summary
    with pytest.raises(D.DataError, match="bad.jsonl:2: not JSON"):
        D.read_ultrachat(path, tok, strict=True)
    for lineno, (line, reason) in enumerate(MALFORMED[2:], start=3):
        one = write_jsonl(tmp_path / f"one{lineno}.jsonl",
                          [MALFORMED[0][0]] * (lineno - 1) + [line])
        with pytest.raises(D.DataError, match=rf"one{lineno}.jsonl:{lineno}: {reason}"):
            D.read_ultrachat(one, tok, strict=True)


CHATTERBOT = """categories:
- animals
conversations:
- - What does the owl eat?
  - Mice, mostly.
- - Hello
  - Hi!
  - How are you?
  - |
    Fine, thanks.
    And you?
- 'Which year? - 1984'
- - What does the owl eat?
  - Mice, mostly.
- - Name a prime.
  - 7
"""


def test_chatterbot_reader(tok, tmp_path):
    """chatterbot-corpus YAML: each conversation is read as the UltraChat record {"data": turns}
    (the same examples as read_ultrachat gives for them, numbers and block scalars as their text), a
    repeated example is kept once, and a conversation that is not a list of turns is skipped, or
    with strict=True named by file:line."""
    pytest.importorskip("yaml")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "animals.yml").write_text(CHATTERBOT)
    r = D.read_chatterbot(folder, tok, seed=3)
    turns = [["What does the owl eat?", "Mice, mostly."],
             ["Hello", "Hi!", "How are you?", "Fine, thanks.\nAnd you?\n"], ["Name a prime.", "7"]]
    reference = D.read_ultrachat(write_jsonl(tmp_path / "same.jsonl", [{"data": d} for d in turns]),
                                 tok, seed=3)
    assert [(e.prompt.tolist(), e.response.tolist()) for e in r.examples] == \
        [(e.prompt.tolist(), e.response.tolist()) for e in reference.examples]
    assert (r.lines, r.repeats, dict(r.malformed)) == (5, 1,
                                                       {"a conversation is not a list of turns": 1})
    assert "1 repeats of kept examples, skipped 1 malformed" in str(r)
    with pytest.raises(D.DataError, match=r"animals.yml:12: a conversation is not a list of turns"):
        D.read_chatterbot(folder / "animals.yml", tok, strict=True)
    (folder / "broken.yml").write_text("conversations:\n- - a\n  - [b\n")
    with pytest.raises(D.DataError, match=r"broken.yml:\d+: not YAML"):
        D.read_chatterbot(folder / "broken.yml", tok, strict=True)
    # by the file's name
    assert D.read_task([str(folder / "animals.yml")], tok, seed=3).repeats == 1
    with pytest.raises(D.DataError, match="UltraChat JSONL and chatterbot YAML files in one "
                       "--data"):
        D.read_task([str(folder / "animals.yml"), str(tmp_path / "same.jsonl")], tok)


def hh(prompt_turns, chosen, rejected):
    p = "".join(f"\n\n{who}: {said}" for who, said in prompt_turns) + "\n\nAssistant: "
    return {"chosen": p + chosen, "rejected": p + rejected}


def test_hh_reader(tok, tmp_path):
    multi = hh([("Human", "Tell me about the owl."), ("Assistant", "It hoots."),
                ("Human", "What does it eat?")], "The owl mostly eats mice and insects.",
               "I do not know.")
    records = [multi, hh([("Human", "Hi.")], "Hello.", "Go away."),
               {"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.",
                "rejected": "\n\nHuman: Bye.\n\nAssistant: Hello."},
               {"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello."},
               {"chosen": "\n\nHuman: Hi.\n\nAssistant:", "rejected": "\n\nHuman: "
                "Hi.\n\nAssistant: Yes."}, {"chosen": "\n\nAssistant: Hi.\n\nHuman: Hello.",
                                            "rejected": "\n\nAssistant: Hi.\n\nHuman: Yo."}]
    for name in ("hh.jsonl", "hh.jsonl.gz"):
        r = D.read_hh(write_jsonl(tmp_path / name, records), tok)
        assert len(r.examples) == 2 and sum(r.malformed.values()) == 4, str(r)
        e = r.examples[0]
        assert text(tok, e.prompt) == ("Human: Tell me about the owl.\n\nAssistant: It hoots.\n\n"
                                       "Human: What does it eat?\n\nAssistant:")
        assert text(tok, e.chosen) == "The owl mostly eats mice and insects."
        assert text(tok, e.rejected) == "I do not know."
        assert e.chosen[-1] == e.rejected[-1] == tok.eos_id
    assert set(r.malformed) == {"'chosen' and 'rejected' have different prompts",
                                "missing 'chosen' or 'rejected'", "empty turn",
                                "turns do not alternate Human, Assistant, … starting with Human"}
    with pytest.raises(D.DataError, match="hh.jsonl:3: 'chosen' and 'rejected' have different "
                       "prompts"):
        D.read_hh(tmp_path / "hh.jsonl", tok, strict=True)
    short = D.read_hh(tmp_path / "hh.jsonl", tok, max_tokens=12)
    assert short.too_long >= 1
    assert all(len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= 12 for e in short.examples)


# -----------------------------------------------------------------------------
# Batches and masks


def test_mask_scores_only_response_and_eos():
    eos = 2
    prompts = [[1, 5, eos, 6], [1, 7]]  # the first prompt contains the EOS id itself
    responses = [[8, 9, eos], [10, eos]]
    tokens, mask = D.response_batch(prompts, responses, pad_id=eos)  # pad == eos
    assert tokens.tolist() == [[1, 5, eos, 6, 8, 9, eos], [1, 7, 10, eos, eos, eos, eos]]
    assert mask.tolist() == [[False] * 4 + [True] * 3, [False, False, True, True, False, False,
                                                        False]]
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="at least one token"):
        D.response_batch([[1]], [[]])


def test_padded_batches_score_like_single_rows(tok):
    """Right padding (ours) and left padding (model.generate's) change no row's ℓ̄."""
    with one_thread():
        model = tiny_lm(tok.vocab_size).eval()
        prompts = [tok.encode("Human: Tell me about the owl.\n\nAssistant:"),
                   tok.encode("Human: Hi.\n\nAssistant:")]
        gen = torch.Generator().manual_seed(0)
        responses, ended = M.generate(model, prompts, max_new_tokens=12, eos_id=tok.eos_id,
                                      generator=gen)
        with torch.no_grad():
            tokens, mask = D.response_batch(prompts, responses, pad_id=tok.eos_id)
            batched = l3m.logp_norm(model(tokens), tokens, mask)
            for i, (p, r) in enumerate(zip(prompts, responses)):
                assert mask[i].sum() == len(r) and tokens[i, mask[i]].tolist() == r
                t1, m1 = D.response_batch([p], [r])
                # float32 sums
                assert torch.allclose(batched[i], l3m.logp_norm(model(t1), t1, m1), atol=1e-5)


def test_packed_batch_scores_each_sequence_as_if_alone(tok):
    """Packed into one row, each sequence gets the logits and ℓ̄ it gets alone, exactly
    (float64): catches RoPE positions that do not restart, attention across sequences,
    and a mask or a segment sum off by one."""
    torch.manual_seed(0)
    model = M.Transformer(tiny_args(vocab_size=tok.vocab_size)).init_weights(1).double()
    ex = [D.TaskExample(D.encode_prompt(tok, [("user", u)]), D.encode_response(tok, a))
          for u, a in (("Hi.", "Hello there."), ("Tell me about the owl.", "It hoots."),
                       ("And the snail?", "It is slow, and it lives in damp gardens. It carries "
                        "its shell on its back, and it eats leaves at night."))]
    prompts, responses = [e.prompt for e in ex], [e.response for e in ex]
    tokens, mask, segments = D.packed_batch(prompts, responses)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert tokens.shape == (2, max(lengths))  # the longest alone, the two others share a row
    logits = model(tokens, segments=segments)
    packed = l3m.logp_norm(logits, tokens, mask, segments=segments)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        mine = segments == i  # the sequence, then any padding of its row
        assert tokens[mine][:lengths[i]].tolist() == p.tolist() + r.tolist()
        assert tokens[mine & mask].tolist() == r.tolist()
        t1, m1 = D.response_batch([p], [r])
        alone = model(t1)
        assert torch.allclose(logits[mine][:lengths[i]], alone[0], atol=1e-12)
        assert torch.allclose(packed[i], l3m.logp_norm(alone, t1, m1)[0], atol=1e-12)
    with pytest.raises(ValueError, match="first token"):
        l3m.logp_norm(logits, tokens, segments == 1, segments=segments)


def test_packed_batch_takes_the_fewest_rows_and_pads_the_demo_task_under_a_tenth(tok, data_dir):
    """Rows: ⌈Σ|s| / max|s|⌉, the fewest the tokens allow, as short as first fit (longest first)
    lets them be. Lengths 5, 5, 4, 3, 3 (20 tokens): rows of 5, the longest's, need 5 rows (25
    slots); 4 rows of 6 hold them (24). Then one epoch of the demo's task batches, as train.py
    packs them: at most 10 % padding (rows of the longest's length alone: 12.8 %)."""
    import train
    lengths = [5, 5, 4, 3, 3]
    prompts = [np.arange(1, n) for n in lengths]  # prompt n − 1 tokens, response 1
    tokens, mask, _ = D.packed_batch(prompts, [np.array([7])] * len(lengths))
    assert tokens.shape == (4, 6) and mask.sum() == len(lengths)
    assert (tokens != 0).sum(1).tolist() == [5, 5, 4, 6]  # the two 3s share the last row
    cfg = train.parse_config([f"--data_dir={data_dir}"])
    examples, _, _ = train.load_data(cfg, tok)
    stream = D.Stream(len(examples), cfg.batch_size, cfg.seed, 0, 1)
    slots = real = 0
    for _ in range(stream.per_epoch):
        batch = [examples[i] for i in stream.next()]
        tokens, _, _ = D.packed_batch([e.prompt for e in batch], [e.response for e in batch])
        lengths = [len(e.prompt) + len(e.response) for e in batch]
        assert len(tokens) == math.ceil(sum(lengths) / max(lengths))
        slots += tokens.numel()
        real += sum(lengths)
    assert 1 - real / slots <= 0.10


# -----------------------------------------------------------------------------
# Splits and shards


def test_split_disjoint_covering_reproducible():
    items = list(range(1000))
    train, val, test = D.split_dataset(items, val=17, test=0.05, seed=1)
    assert (len(train), len(val), len(test)) == (933, 17, 50)
    assert sorted(train + val + test) == items
    assert (train, val, test) == D.split_dataset(items, val=17, test=0.05, seed=1)
    assert D.split_dataset(items, val=17, test=0.05, seed=2)[1] != val
    with pytest.raises(ValueError, match="cannot take"):
        D.split_dataset(items, val=600, test=600)


def test_shards_disjoint_equal_and_resumable():
    n, bs, world = 103, 4, 3  # 103 // 12 = 8 global batches an epoch, 7 examples dropped
    assert D.num_batches(n, bs, world) == 8
    batch = lambda position, rank, seed=5: D.batch_indices(n, bs, position, seed=seed, rank=rank,
                                                           world_size=world)
    epoch = [[batch(p, r) for p in range(8)] for r in range(world)]  # epoch 0, every rank
    seen = np.concatenate([b for shard in epoch for b in shard])
    assert all(len(b) == bs for shard in epoch for b in shard)
    # disjoint across ranks and batches
    assert len(seen) == len(set(seen.tolist())) == 8 * bs * world
    # a function of the position
    assert [batch(p, 1).tolist() for p in range(8)] == [b.tolist() for b in epoch[1]]
    next_epoch = np.concatenate([batch(p, r) for p in range(8, 16) for r in range(world)])
    # a new permutation
    assert next_epoch.tolist() != seen.tolist() and len(set(next_epoch.tolist())) == len(seen)
    assert batch(0, 0, seed=6).tolist() != epoch[0][0].tolist()
    with pytest.raises(ValueError, match="at least one global batch"):
        D.batch_indices(10, 4, 0, seed=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        D.batch_indices(n, bs, 0, seed=5, rank=3, world_size=world)


def test_stream_is_batch_indices_in_turn_and_resumes_at_its_position():
    n, bs, world = 23, 2, 3  # 23 // 6 = 3 global batches an epoch: positions 0-5 cross epoch 0 -> 1
    stream = D.Stream(n, bs, seed=4, rank=1, world=world)
    assert stream.per_epoch == 3 and stream.position == 0
    batch = lambda p: D.batch_indices(n, bs, p, seed=4, rank=1, world_size=world).tolist()
    assert [stream.next().tolist() for _ in range(6)] == [batch(p) for p in range(6)]
    assert stream.position == 6
    resumed = D.Stream(n, bs, seed=4, rank=1, world=world)
    resumed.position = 2  # a resume sets only the position
    assert [resumed.next().tolist() for _ in range(4)] == [batch(p) for p in range(2, 6)]


# -----------------------------------------------------------------------------
# Demo data


def test_demo_is_deterministic_and_cached(demo, tmp_path):
    again = D.prepare_demo(tmp_path, seed=0)
    for field in ("tokenizer", "task", "informative_train", "cautious_test"):
        assert getattr(again, field).read_bytes() == getattr(demo, field).read_bytes(), field
    stamp = again.task.stat().st_mtime_ns
    assert D.prepare_demo(tmp_path, seed=0).task.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert D.prepare_demo(tmp_path, seed=1).task.read_bytes() != demo.task.read_bytes()


def test_demo_concurrent_callers_build_once(tmp_path, monkeypatch):
    """Ranks call prepare_demo at once: one builds, the others wait and reuse it, nobody replaces
    it."""
    monkeypatch.setattr(D, "DEMO_SIZES", {"task": 20, "preference_train": 5, "preference_test": 2})
    builds, results, start = [], [None] * 4, threading.Barrier(4)
    write_demo = D._write_demo

    def counted_write_demo(folder, *args):
        builds.append(folder)
        return write_demo(folder, *args)

    def call(i):
        start.wait()
        files = D.prepare_demo(tmp_path, seed=0)
        results[i] = [getattr(files, f).read_bytes() for f in ("tokenizer", "task",
                                                               "cautious_test")]

    monkeypatch.setattr(D, "_write_demo", counted_write_demo)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results[0] is not None and all(r == results[0] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_v1_seed0_vocab1024",
                                                          "demo_v1_seed0_vocab1024.lock"]


def test_demo_task_lengths_spread(demo, tok):
    r = D.read_ultrachat(demo.task, tok)
    assert len(r.examples) == D.DEMO_SIZES["task"] and not r.malformed and r.too_long == 0
    lengths = np.array([len(e.response) - 1 for e in r.examples])  # |y| without the EOS
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    print(f"\ndemo response length in tokens: p10 {p10:.0f}, median {p50:.0f}, p90 {p90:.0f}, "
          f"min {lengths.min()}, max {lengths.max()}, vocab {tok.vocab_size}")
    assert p10 <= 25 and p90 >= 80 and lengths.min() >= 5
    # broad and smooth: no length bin of 10 tokens between p10 and p90 holds more than 15 % of
    # the data
    hist, _ = np.histogram(lengths, bins=np.arange(p10, p90 + 10, 10))
    assert hist.max() <= 0.15 * len(lengths)
    # the length is not fixed by the question: the same question gets short and long answers
    by_prompt = {}
    for e in r.examples:
        by_prompt.setdefault(e.prompt.tobytes(), []).append(len(e.response))
    spreads = [max(v) - min(v) for v in by_prompt.values() if len(v) >= 5]
    assert np.median(spreads) >= 40


def test_demo_properties_negatively_correlated(demo):
    responses = [json.loads(line)["data"][1] for line in open(demo.task)]
    props = np.array([D.demo_properties(y) for y in responses])  # (N, 2): informative, cautious
    corr = np.corrcoef(props.T)[0, 1]
    print(f"\ndemo task responses: corr(informative, cautious) = {corr:.2f}, means "
          f"{props.mean(0).round(2)}")
    assert corr < -0.3
    assert D.demo_properties("The owl lives in old forests. Never try to touch or feed a wild "
                             "owl.") == (0.5, 0.5)
    assert D.demo_properties("The owl lives in old forests. Blah blah.") == (0.5, 0.0)
    for prop, which in (("informative", 0), ("cautious", 1)):
        for line in open(getattr(demo, f"{prop}_train")):
            pair = json.loads(line)
            answers = (pair[k].split("\n\nAssistant: ")[-1] for k in ("chosen", "rejected"))
            plus, minus = (D.demo_properties(a)[which] for a in answers)
            assert plus > minus


# -----------------------------------------------------------------------------
# train.py: runs as subprocesses, one process or two (torchrun, gloo)

TINY = ["--init=scratch", "--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1",
        "--batch_size=8", "--micro_batch=4", "--val=8", "--test=8", "--max_new_tokens=8",
        "--eval_every=0", "--ckpt_every=0", "--lr=3e-3"]


def train_cmd(out_dir, data_dir, *flags, nproc=1):
    cmd = [sys.executable, os.path.join(HERE, "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", os.path.join(HERE, "train.py")]
    return cmd + TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(out_dir, data_dir, *flags, nproc=1, timeout=240):
    """train.py with TINY and these flags, one thread per rank; returns what it printed. On two
    ranks under torchrun; on one, in this process (train_here)."""
    if nproc == 1:
        return train_here(train_cmd(out_dir, data_dir, *flags)[2:])
    p = subprocess.run(train_cmd(out_dir, data_dir, *flags, nproc=nproc), env=ONE_THREAD,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def train_here(argv):
    """train.main(argv) in this process, as a world of one on one thread, returning what it printed:
    faster than a new interpreter (which spends ~4 s importing torch), and a test can spy on the
    functions it calls."""
    import train
    assert "RANK" not in os.environ  # not under torchrun: train.py makes a world of one
    threads, sigterm = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    printed = io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            train.main(argv)
    finally:  # run() installs its SIGTERM handler in this process: give pytest its own back
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    return printed.getvalue()


def ledger(out_dir, drop=("t_sample", "t_train")):
    with open(os.path.join(out_dir, "ledger.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "final", "model.pth"), weights_only=True)


def resume_flags(tiny_base, nproc=1):
    """An 8-step L3M run of tiny_base; on two ranks with activation checkpointing, which must not
    change it."""
    return ["--method=l3m", "--steps=8", f"--init={tiny_base}", "--max_new_tokens=32",
            "--constraint=length>=20",
            "--constraint=length<=30"] + (["--activation_checkpointing=True"] if nproc > 1 else [])


@pytest.fixture(scope="session")
def straight(tiny_base, data_dir, tmp_path_factory):
    """straight(nproc): the out_dir of an uninterrupted run of resume_flags on nproc ranks, made
    once and shared by the tests of interrupted runs (checkpointing does not change a run, so one
    reference serves them all)."""
    def get(nproc):
        out = shared(tmp_path_factory, f"straight{nproc}")
        with built_once(out):
            if not (out / "final").is_dir():
                run_train(out, data_dir, *resume_flags(tiny_base, nproc), "--overwrite=True",
                          nproc=nproc)
        return out
    return get


def test_two_processes_match_one(straight):
    """Two ranks (gloo) give the losses and parameters of one process on the same global batch.

    Proves the shared coin, the global Ĉ (the rollouts end at varied lengths, so a rank's own
    batch mean is not the global one), the rollouts and the gradient averaging. Rollouts
    sample with one generator per row keyed by the row's global index, so they do not depend
    on the split over ranks. The two-rank run also recomputes activations (checkpointing),
    which must not change the numbers. The two runs differ only in float summation order
    (micro-batches of 4 rows on each rank instead of two on one rank; reductions over ranks),
    ~1e-7 relative per step: 1e-5 covers 8 Adam steps. (A run stopped on two ranks and resumed
    on one: test_sigterm_checkpoints_and_resume_is_exact.) """
    one, two = ledger(straight(1)), ledger(straight(2))
    assert {r["kind"] for r in one} == {"task", "constraint"}
    # rows of different lengths: each rank's batch mean of c differs from the global one
    assert all(r["len_p10"] < r["len_p90"] for r in one if r["kind"] == "constraint")
    for a, b in zip(one, two):
        assert a["kind"] == b["kind"] and a.get("len_mean") == b.get("len_mean")
        for key in ("C", "C_hat", "lam"):
            if a["kind"] == "constraint":
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert_close_run(straight(1), straight(2))
    # FSDP2 shards each parameter's first dimension (torch.chunk: rank 0 holds ⌈n₀/2⌉ of n₀ rows)
    # and AdamW's two moments follow their parameter: on two ranks each holds half of the whole, up
    # to that rounding.
    whole = final_weights(straight(1)).values()
    held = {n: json.loads((straight(n) / "report.json").read_text())["bytes_per_rank"]
            for n in (1, 2)}
    assert held[1]["parameters"] == sum(w.nbytes for w in whole)
    assert held[2]["parameters"] == sum(-(-w.shape[0] // 2) * w[0].nbytes for w in whole)
    assert all(h["optimizer"] == 2 * h["parameters"] for h in held.values())


def assert_close_run(one, other):
    """The same steps and losses as the one-process run `one`, and final weights within float noise.
    Adam divides each coordinate's step by that coordinate's gradient scale, which amplifies float
    noise where the gradient is ~0 (embedding rows of tokens absent from the batches): compare whole
    tensors. Seen: ≤ 1.2e-5 relative (the embedding) after 6 steps, ≤ 1e-5 elsewhere."""
    assert len(ledger(other)) == len(ledger(one))
    for a, b in zip(ledger(one), ledger(other)):
        assert a["kind"] == b["kind"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    w1, w2 = final_weights(one), final_weights(other)
    assert max(((w1[k] - w2[k]).norm() / w1[k].norm()).item() for k in w1) <= 1e-4


def test_resume_reads_a_flag_added_since_the_checkpoint_as_its_default(tmp_path):
    """A checkpoint written before --baseline existed resumes with the default, and refuses another
    value."""
    import train
    (tmp_path / "ckpt").mkdir()
    config = dataclasses.asdict(train.parse_config([f"--out_dir={tmp_path}"]))
    del config["baseline"]
    torch.save({"config": config}, tmp_path / "ckpt" / "state.pt")
    train.check_resume(train.parse_config([f"--out_dir={tmp_path}", "--resume=True"]))
    with pytest.raises(train.ConfigError, match=r"--baseline='loo' \(the checkpoint's: 'none'\)"):
        train.check_resume(train.parse_config([f"--out_dir={tmp_path}", "--resume=True",
                                               "--baseline=loo"]))


def test_loo_baseline_is_taken_over_the_global_batch(tiny_base, data_dir, tmp_path):
    """--baseline=loo on two ranks gives one rank's losses and weights: each rank's c' uses the
    whole global batch (all-gathered c and |y|), not its own half: leaving out the gather changes
    the constraint steps' losses far beyond float noise. And the baseline changes the run: its
    losses differ from the plain run's."""
    flags = ["--method=l3m", "--steps=6", f"--init={tiny_base}", "--max_new_tokens=32",
             "--constraint=length>=20", "--constraint=length<=30", "--overwrite=True"]
    run_train(tmp_path / "one", data_dir, *flags, "--baseline=loo")
    run_train(tmp_path / "two", data_dir, *flags, "--baseline=loo", nproc=2)
    run_train(tmp_path / "plain", data_dir, *flags)
    assert any(r["kind"] == "constraint" for r in ledger(tmp_path / "one"))
    assert_close_run(tmp_path / "one", tmp_path / "two")
    differ = [a["loss"] != pytest.approx(b["loss"], rel=1e-3)
              for a, b in zip(ledger(tmp_path / "one"), ledger(tmp_path / "plain"))
              if a["kind"] == "constraint"]
    assert any(differ)


def assert_same_run(a, b):
    """The same ledger (times aside) and bit-identical final weights."""
    assert ledger(a) == ledger(b)
    w1, w2 = final_weights(a), final_weights(b)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_resume_continues_exactly(tmp_path, data_dir, tiny_base, straight):
    """Stopped after step 3 and resumed: the same ledger and weights as one straight run. The
    rollouts end at varied lengths, so Ĉ (an EMA) differs from the batch means after the
    resume point: a resume that lost the multipliers' state would restart Ĉ from the first
    batch it sees."""
    flags = resume_flags(tiny_base)
    run_train(tmp_path / "halves", data_dir, *flags, "--ckpt_every=3", "--stop_after=3")
    assert not os.path.exists(tmp_path / "halves" / "final")
    run_train(tmp_path / "halves", data_dir, *flags, "--ckpt_every=3", "--resume=True")
    rows = ledger(straight(1))
    kinds = [r["kind"] for r in rows]
    assert "constraint" in kinds[:3] and "constraint" in kinds[3:]
    assert any(r["C"] != r["C_hat"] for r in rows[3:] if r["kind"] == "constraint")
    assert_same_run(straight(1), tmp_path / "halves")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, data_dir, tiny_base, straight, nproc):
    """SIGTERM in the middle of a run (to the process, or to torchrun, which passes it on to every
    rank): the run finishes its step on every rank, checkpoints, says how to resume and exits
    non-zero; resumed, its ledger and weights equal those of a run never interrupted. The two-rank
    checkpoint also resumes on one rank: resharded on load, with global data positions, coin and
    sampling keys, it ends as the one-process run does (to float noise: assert_close_run)."""
    flags = resume_flags(tiny_base, nproc)
    p = subprocess.Popen(train_cmd(tmp_path / "cut", data_dir, *flags, nproc=nproc), env=ONE_THREAD,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (os.path.isfile(tmp_path / "cut" / "ledger.jsonl")
               and len(ledger(tmp_path / "cut")) >= 3):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0, out[-2000:] + err[-2000:]
    assert "continue with the same flags and --resume=True" in out, out[-2000:] + err[-2000:]
    cut = len(ledger(tmp_path / "cut"))
    assert 3 <= cut < 8 and not os.path.exists(tmp_path / "cut" / "final")
    if nproc == 2:
        shutil.copytree(tmp_path / "cut", tmp_path / "onto_one")
        run_train(tmp_path / "onto_one", data_dir, *resume_flags(tiny_base), "--resume=True")
        assert_close_run(straight(1), tmp_path / "onto_one")
    run_train(tmp_path / "cut", data_dir, *flags, "--resume=True", nproc=nproc)
    assert_same_run(straight(nproc), tmp_path / "cut")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_while_checkpointing_leaves_the_last_checkpoint(tmp_path, data_dir, tiny_base,
                                                                straight, nproc):
    """SIGKILL on rank 0 while it writes its second checkpoint (shards written, state file not yet):
    the first checkpoint is whole, the resumed run drops the ledger lines after it and ends equal to
    a straight run."""
    script = tmp_path / "kill.py"
    script.write_text(f"""
import os, signal, sys, torch
sys.path.insert(0, {HERE!r})
import train
saves, save = [], torch.save
def killed_at_second_state(obj, path, *a, **k):
    saves.append(str(path)) if str(path).endswith("state.pt") else None
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, path, *a, **k)
torch.save = killed_at_second_state
train.main(sys.argv[1:])
train.exit_now(0)  # as train.py's __main__: no teardown (train.exit_now)
""")
    flags = resume_flags(tiny_base, nproc) + ["--ckpt_every=3"]
    cmd = train_cmd(tmp_path / "cut", data_dir, *flags, nproc=nproc)
    cmd[cmd.index(os.path.join(HERE, "train.py"))] = str(script)
    p = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
    # killed after step 6, saving it
    assert p.returncode != 0 and len(ledger(tmp_path / "cut")) == 6
    assert torch.load(tmp_path / "cut" / "ckpt" / "state.pt", weights_only=False)["step"] == 3
    run_train(tmp_path / "cut", data_dir, *flags, "--resume=True", nproc=nproc)
    # no stale tmp
    assert sorted(os.listdir(tmp_path / "cut")) == ["ckpt", "final", "ledger.jsonl", "report.json"]
    assert_same_run(straight(nproc), tmp_path / "cut")


@pytest.mark.parametrize("side, band", [("above", (5, 15)), ("below", (50, 70))])
def test_loop_moves_length_toward_band_by_the_method(tmp_path, monkeypatch, data_dir, tiny_base,
                                                     side, band):
    """The real loop, on the tiny base (mean test length ~31 tokens), under a band above
    or below it.

    Direction: the mean test length goes at least halfway from where it began to the violated bound.
    Exactness, step by step, from spies on what the loop hands to the method:
    - c = b − r for the step's own rollouts (lo − |y| and |y| − hi), exactly;
    - Ĉ is the EMA (α = 0.1) of the batch means of c (closed form), λ̂ = µ/(k·max(−Ĉ, µ²)) at this
      step's µ = µ_0·(µ_T/µ_0)^(t/(T−1)), and that λ̂ is what weights the surrogate;
    - the gradient AdamW steps on has norm ≤ --grad_clip, while the ledger's norms before clipping
      exceed it (λ̂ reaches 1/(kµ)), so the clip is not idle.
    """
    import train
    lo, hi = band
    rollouts, observed, weights, step_norms = [], [], [], []
    real_rollout, real_observe = train.rollout, l3m.Multipliers.observe
    real_surrogate = l3m.reinforce_surrogate
    real_step = torch.optim.AdamW.step

    def rollout(*a, **k):
        rollouts.append(real_rollout(*a, **k))
        return rollouts[-1]

    def observe(self, c, all_reduce=None):
        observed.append((rollouts[-1], c.clone()))
        return real_observe(self, c, all_reduce)

    def surrogate(logp, c, lam):
        weights.append((c.clone(), lam.clone()))
        return real_surrogate(logp, c, lam)

    def step(self, *a, **k):
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for g in self.param_groups for p in g["params"] if p.grad is not None]
        step_norms.append(torch.cat([x.flatten() for x in grads]).norm().item())
        return real_step(self, *a, **k)

    monkeypatch.setattr(train, "rollout", rollout)
    monkeypatch.setattr(l3m.Multipliers, "observe", observe)
    monkeypatch.setattr(l3m, "reinforce_surrogate", surrogate)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    steps = 32
    train_here([f"--init={tiny_base}", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                "--method=l3m", f"--steps={steps}", "--batch_size=16", "--micro_batch=16",
                "--lr=3e-3", "--val=8", "--test=16", "--max_new_tokens=96", "--eval_every=0",
                "--ckpt_every=0", f"--constraint=length>={lo}", f"--constraint=length<={hi}"])
    report = json.loads((tmp_path / "report.json").read_text())
    before, after = report["before"]["length_mean"], report["after"]["length_mean"]
    print(f"band [{lo}, {hi}] from {side}: mean test length {before:.1f} -> {after:.1f}")
    violated = f"length<={hi}" if side == "above" else f"length>={lo}"
    assert not report["before"]["constraints"][violated]["satisfied"]
    # At least halfway to the violated bound, or past it. Where 32 steps end is noisy (16 test
    # prompts: seeds 0-2 went 78 % to 206 % of the way), but a flipped cost or λ̂ moves the length
    # away from the band.
    edge = hi if side == "above" else lo
    assert (after - before) / (edge - before) >= 0.5

    rows = ledger(tmp_path)
    assert [r["mu"] for r in rows] == pytest.approx([mu_at(t, steps - 1) for t in range(steps)],
                                                    rel=1e-12)
    con = [r for r in rows if r["kind"] == "constraint"]
    assert len(con) == len(observed) == len(weights) >= 6
    C_hat = None
    for r, (samples, c), (c_used, lam_used) in zip(con, observed, weights):
        n = torch.tensor([len(y) - e for y, e in zip(samples.responses, samples.ended)],
                         dtype=torch.float32)
        # c = b − r, r = (|y|, −|y|), b = (lo, −hi)
        assert torch.equal(c, torch.stack([lo - n, n - hi], 1))
        assert torch.equal(c_used, c)
        mean = c.double().mean(0)
        C_hat = mean if C_hat is None else 0.9 * C_hat + 0.1 * mean
        assert r["C_hat"] == pytest.approx(C_hat.tolist(), rel=1e-9, abs=1e-12)
        mu = mu_at(r["step"], steps - 1)
        expected = mu / (2 * torch.clamp(-C_hat, min=mu ** 2))  # λ̂ (§5.2), k = 2
        assert lam_used.double() == pytest.approx(expected.tolist(), rel=1e-6)
    assert len(step_norms) == steps and max(step_norms) <= 1.0 * (1 + 1e-4)
    assert max(r["grad_norm"] for r in con) > 10.0


def test_rollouts_of_different_lengths_do_not_hang(tmp_path):
    """Rank 0's rows end at once, rank 1's never: sampling on gathered weights runs no collective,
    so the ranks decode different numbers of steps and still meet at the next training step."""
    script = tmp_path / "hang.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {HERE!r})
import train, model as M
cfg = train.parse_config(["--init=scratch", "--dim=32", "--n_layers=2", "--n_heads=2",
                          "--n_kv_heads=1"])
rank, world, device = train.setup_distributed("cpu")
model, args = train.build_model(cfg, device, "scratch", tokenizer_vocab=50)
with train.gathered(model):
    first = model(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()
    eos = first if rank == 0 else 50  # rank 1: an id the model never emits
    out, ended = M.generate(model, [[1, 2, 3]] * 2, max_new_tokens=40, eos_id=eos, temperature=0)
# the ranks share stdout: one argument, one write (the newline is another); the test looks
# for each text, not for lines
print(f"{{rank}} {{[len(o) for o in out]}}", flush=True)
loss = model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean()
loss.backward()
dist.barrier()
print(f"{{rank}} trained", flush=True)
dist.destroy_process_group()
""")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                       timeout=120, env=ONE_THREAD)
    # What is tested is that both ranks meet after decoding and train: each says so. The exit
    # code is not asserted: under load a rank sometimes aborts while the gloo group is torn down,
    # after its work ("terminate called without an active exception"), which is not what this
    # test is about.
    assert "0 [1, 1]" in p.stdout and "1 [40, 40]" in p.stdout, p.stderr[-3000:]
    assert "0 trained" in p.stdout and "1 trained" in p.stdout, p.stderr[-3000:]


def test_rollouts_run_on_a_bare_model_and_gathered_restores_resharding(tmp_path):
    """Inside `gathered`, rollouts decode on a plain Transformer that shares the unsharded weights:
    no FSDP unit and no activation-checkpointing wrapper in it, the same tokens as through the FSDP
    model. On exit every unit reshards after forward as build_model set it (blocks yes, the root
    no), before and after the first training forward."""
    script = tmp_path / "bare.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {HERE!r})
import train, model as M
cfg = train.parse_config(["--init=scratch", "--dim=32", "--n_layers=2", "--n_heads=2",
                          "--n_kv_heads=1", "--activation_checkpointing=True"])
rank, world, device = train.setup_distributed("cpu")
model, args = train.build_model(cfg, device, "scratch", tokenizer_vocab=50, shard=True)
units = [m for m in model.modules() if isinstance(m, train.FSDPModule)]
# FSDP2 keeps the setting as each parameter group's post-forward mesh (None: keep the weights)
def reshards():
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    return [g.post_forward_mesh_info is not None for g in groups]
assert reshards() == [False, True, True], reshards()  # the root, then the two blocks
for _ in range(2):
    with train.gathered(model) as (plain,):
        assert not any(isinstance(m, train.FSDPModule) for m in plain.modules())
        # no checkpoint() wrapper
        assert all("forward" not in vars(block) for block in plain.layers)
        pairs = zip(plain.parameters(), model.parameters())
        assert all(p.data_ptr() == q.data_ptr() for p, q in pairs)
        prompts = [[1, 2, 3], [4]]
        seeded = lambda: torch.Generator().manual_seed(0)
        sample = lambda m: M.generate(m, prompts, 12, eos_id=49, generator=seeded())
        assert sample(plain) == sample(model)
    assert reshards() == [False, True, True], reshards()
    model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean().backward()
print("ok")
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=ONE_THREAD)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_one_rank_trains_a_plain_model_with_the_fsdp_paths_loss_and_gradients(tmp_path):
    """On one rank build_model leaves the model plain (no FSDP unit, plain tensors); a task step
    of 3 micro-batches on it gives the loss, the gradient (read at AdamW's step, before it
    clears them) and the weights after AdamW that the FSDP2 path gives on the same rank: seen
    bit-identical (one thread, torch 2.13.0); the tolerances leave room for float32 rounding
    where FSDP2's DTensor norm is summed in another order."""
    script = tmp_path / "plain.py"
    script.write_text(f"""
import sys, types, torch
sys.path.insert(0, {HERE!r})
import train, data as D
cfg = train.parse_config(["--init=scratch", "--dim=32", "--n_layers=2", "--n_heads=2",
                          "--n_kv_heads=1", "--batch_size=6", "--micro_batch=2"])
rank, world, device = train.setup_distributed("cpu")
g = torch.Generator().manual_seed(0)
draw = lambda n: torch.randint(3, 50, (n,), generator=g).numpy()
examples = [D.TaskExample(draw(p), draw(r)) for p, r in ((4, 7), (9, 2), (3, 12), (6, 6), (2, 9),
                                                         (11, 3))]
full = lambda t: t.full_tensor() if isinstance(t, train.DTensor) else t
runs = []
for shard in (None, True):
    model, _ = train.build_model(cfg, device, "scratch", tokenizer_vocab=50, shard=shard)
    sharded = any(isinstance(m, train.FSDPModule) for m in model.modules())
    assert sharded == bool(shard), shard
    names = {{p: n for n, p in model.named_parameters()}}
    opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-2, fused=True)
    grads = {{}}
    opt.register_step_pre_hook(lambda o, a, k: grads.update(
        {{names[p]: full(p.grad).clone() for p in model.parameters()}}))
    trainer = types.SimpleNamespace(cfg=cfg, device=device, model=model, optimizer=opt,
                                    train_set=examples,
                                    task_stream=types.SimpleNamespace(next=lambda: range(6)))
    record = train.task_step(trainer)
    weights = {{n: full(p).detach().clone() for n, p in model.named_parameters()}}
    runs.append((record, grads, weights))
(plain, grads, weights), (fsdp, grads2, weights2) = runs
assert plain["loss"] == fsdp["loss"], (plain["loss"], fsdp["loss"])
assert abs(plain["grad_norm"] / fsdp["grad_norm"] - 1) < 1e-6, (plain, fsdp)
assert grads.keys() == grads2.keys() == weights.keys() and len(grads) == 2 * 9 + 3
for n in grads:
    assert torch.allclose(grads[n], grads2[n], rtol=1e-6, atol=1e-9), n
    assert torch.allclose(weights[n], weights2[n], rtol=1e-6, atol=1e-9), n
print("ok")
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=ONE_THREAD)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


def test_micro_batches_reduce_scatter_once_per_step(tmp_path, data_dir):
    """Two ranks, one SFT step of 4 rows per rank: in 4 micro-batches FSDP2 reduce-scatters each
    unit's gradient once (after the last micro-batch), as many times as in one micro-batch, and the
    gradient is the same (its norm to float rounding). The mesh is on the device that --device
    names. Each rank writes its count to a file of its own, not to the pipe that torchrun's
    workers share: with PYTHONUNBUFFERED=1 in the environment, print() makes one write per
    argument and separator, and two ranks printing at the same instant came out as
    "reduce-scattersreduce-scatters  33" (3 runs in 80 under load)."""
    script = tmp_path / "count.py"
    script.write_text(f"""
import sys, torch.distributed as dist
sys.path.insert(0, {HERE!r})
import train
calls = []
# FSDP2's reduce-scatter, by torch version
for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
    if hasattr(dist, name):
        def counted(*a, _f=getattr(dist, name), **k):
            calls.append(1)
            return _f(*a, **k)
        setattr(dist, name, counted)
build = train.build_model
def build_and_check(cfg, device, *a, **k):
    model, args = build(cfg, device, *a, **k)
    assert next(model.parameters()).device_mesh.device_type == device.type == "cpu"
    return model, args
train.build_model = build_and_check
train.main(sys.argv[1:-1])  # the last argument: where the counts go
# a file per rank, closed before the exit
with open(sys.argv[-1] + ".{{}}".format(train.rank()), "w") as f:
    f.write(str(len(calls)))
train.exit_now(0)  # as train.py's __main__: no teardown (train.exit_now)
""")
    counts, norms = [], []
    for micro in (4, 1):
        out = tmp_path / f"micro{micro}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script)]
        cmd += TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--method=sft", "--steps=1",
                       "--batch_size=8", f"--micro_batch={micro}", "--eval_before=False",
                       "--show=0", str(tmp_path / f"count{micro}")]
        p = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=240)
        files = [tmp_path / f"count{micro}.{r}" for r in range(2)]
        said = p.stdout[-3000:] + p.stderr[-3000:]
        assert p.returncode == 0 and all(f.exists() for f in files), said
        counts.append([int(f.read_text()) for f in files])
        norms.append(ledger(out)[0]["grad_norm"])
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """`bash gpu_check.sh tiny`: the GPU check's whole script (FSDP2 run, its summary, bench.py's
    rollouts) on a tiny model; `decode tiny` runs bench.py's part alone; a wrong part stops it."""
    run = lambda *args: subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), *args],
                                       capture_output=True, text=True, timeout=300,
                                       env={**ONE_THREAD, "GPU_CHECK_OUT": str(tmp_path)})
    p = run("tiny")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for line in ("task       steps:", "rollouts:", "held by the one rank:", "best/bound"):
        assert line in p.stdout, line
    p = run("decode", "tiny")
    assert p.returncode == 0 and p.stdout.count("best/bound") == 2 and "MFU" not in p.stdout
    p = run("tiny", "bench")
    assert p.returncode == 2 and "unknown argument 'bench'" in p.stderr and not p.stdout


def test_decode_bound_counts_the_kv_cache_and_not_the_embedding():
    """bench.decode_bytes: the weights a decode step reads (all but the embedding table, whose
    `batch` rows it reads) plus the KV cache that the step attends over, byte for byte as
    KVCache allocates it."""
    import bench
    model, batch, max_len = tiny_model(), 3, 40
    cache = M.KVCache(model.args, batch, max_len, torch.zeros(batch, dtype=torch.long),
                      torch.float32, "cpu")
    cache_bytes = sum(t.nbytes for t in cache.k + cache.v)
    weights = sum(p.nbytes for p in model.parameters()) - model.tok_embeddings.weight.nbytes
    assert bench.decode_bytes(model, batch,
                              max_len) == weights + batch * model.args.dim * 4 + cache_bytes


@pytest.mark.parametrize("method, eval_every", [("sft", 0), ("mm", 4)])
def test_methods_run_end_to_end(tmp_path, data_dir, method, eval_every):
    """A run ends with its test split and its model. One that validates (--eval_every > 0) validates
    its final model too, once: the numbers a setting is chosen on (reproduce.py)."""
    out = run_train(tmp_path, data_dir, f"--method={method}", "--steps=4", "--constraint=length>=6",
                    f"--eval_every={eval_every}")
    report = json.loads((tmp_path / "report.json").read_text())
    assert out.count("val (") == ("val" in report) == (eval_every > 0)
    assert eval_every == 0 or (report["val"]["split"], report["val"]["n"]) == ("val (final)", 8)
    assert "before" not in report and report["after"]["n"] == 8  # no 'before' for a random init
    # learning: below a uniform guess (6.43)
    assert report["after"]["perplexity_mean"] < math.log(623) - 0.1
    # model.py's format, tokenizer included
    assert M.load_model(str(tmp_path / "final"))[1] is not None


def test_fluency_is_the_judges_nll_of_the_sampled_answers(tmp_path, monkeypatch, data_dir,
                                                          tiny_base):
    """--fluency_model: each evaluation reports the mean −ℓ̄ of its sampled answers (EOS included)
    under the judge, recomputed here from the rollouts the evaluations drew. The judge is the base
    model before and after 2 SFT steps at a large lr: catches a judge that is the trained policy,
    reference answers scored instead of samples, or answers scored without their prompts."""
    import train
    rollouts = []
    real_rollout = train.rollout

    def rollout(*a, **k):
        rollouts.append(real_rollout(*a, **k))
        return rollouts[-1]

    monkeypatch.setattr(train, "rollout", rollout)
    run_train(tmp_path, data_dir, f"--init={tiny_base}", f"--fluency_model={tiny_base}",
              "--method=sft", "--steps=2", "--lr=3e-2")
    report = json.loads((tmp_path / "report.json").read_text())
    judge, _ = M.load_model(tiny_base)
    assert len(rollouts) == 4  # test split of 8, micro-batches of 4: before, then after
    for when, drawn in (("before", rollouts[:2]), ("after", rollouts[2:])):
        nll, lengths = [], []
        for s in drawn:
            tokens, mask = D.response_batch(s.prompts, s.responses)
            nll += (-logp_norm(judge(tokens), tokens, mask)).tolist()
            lengths += R.length_reward(s).tolist()
        assert report[when]["fluency_mean"] == pytest.approx(np.mean(nll), abs=1e-5)  # float32 sums
        # within the length bins 1–3, 4–7 (TINY's answers are at most 8 tokens): their own means
        nll, lengths = np.array(nll), np.array(lengths)
        for lo, hi in (("1", 4), ("4", 8)):
            x = nll[(lengths >= int(lo)) & (lengths < hi)]
            stats = report[when]["fluency_by_length"][lo]
            assert (stats is None) == (len(x) < 2)
            if stats is not None:
                assert (stats["n"], stats["mean"]) == (len(x), pytest.approx(x.mean(), abs=1e-5))
        assert sum(b["n"] for b in report[when]["fluency_by_length"].values() if b) >= 6
    # the answers changed
    assert abs(report["after"]["fluency_mean"] - report["before"]["fluency_mean"]) > 0.01


def test_rollout_batch_sets_the_prompts_of_a_constraint_step(tmp_path, monkeypatch, data_dir):
    """--rollout_batch=12 with --batch_size=8: every constraint step samples 12 responses to 12
    train prompts and weights all 12 (with their leave-one-out baseline) in its surrogate, while
    task steps keep 8 rows. Catches the flag ignored (8 rollouts) or read for the task batch too."""
    import train
    rollouts, weighted, task_rows = [], [], []
    real_rollout, real_task_loss = train.rollout, l3m.task_loss
    real_surrogate = l3m.reinforce_surrogate

    def rollout(*a, **k):
        rollouts.append(real_rollout(*a, **k))
        return rollouts[-1]

    def surrogate(logp, c, lam):
        weighted.append(len(c))
        return real_surrogate(logp, c, lam)

    def task_loss(logp):
        task_rows.append(len(logp))
        return real_task_loss(logp)

    monkeypatch.setattr(train, "rollout", rollout)
    monkeypatch.setattr(l3m, "reinforce_surrogate", surrogate)
    monkeypatch.setattr(l3m, "task_loss", task_loss)
    run_train(tmp_path, data_dir, "--method=l3m", "--steps=6", "--rollout_batch=12",
              "--baseline=loo", "--eval_before=False")
    kinds = [r["kind"] for r in ledger(tmp_path)]
    drawn = rollouts[:kinds.count("constraint")]  # then the test split's, after training
    assert 0 < len(drawn) < 6 and [len(s.prompts) for s in drawn] == [12] * len(drawn)
    assert weighted == [4, 4, 4] * len(drawn)  # micro-batches of 4
    assert task_rows == [4, 4] * kinds.count("task")


def test_margin_tightens_the_constraint_steps_and_not_the_evaluations(tmp_path, data_dir,
                                                                      tiny_base):
    """--margin=δ: a constraint step's costs are c_i + δ_i, so Ĉ aims at C_i ≤ −δ_i, while
    evaluations keep c_i. The first constraint step follows the same task steps in both runs and
    samples alike, so its batch mean C moves by exactly δ; tiny_base's test report, before training,
    is the same. Catches the margin ignored, subtracted, swapped between constraints, or carried
    into the evaluations."""
    runs = {}
    for name, margins in (("plain", []), ("margin", ["--margin=0.25", "--margin=3"])):
        run_train(tmp_path / name, data_dir, f"--init={tiny_base}", "--method=l3m", "--steps=4",
                  *margins)
        first = next(r for r in ledger(tmp_path / name) if r["kind"] == "constraint")
        report = json.loads((tmp_path / name / "report.json").read_text())
        runs[name] = first, report["before"]["constraints"]
    (plain, plain_before), (tight, tight_before) = runs["plain"], runs["margin"]
    assert tight["len_mean"] == plain["len_mean"]
    # float32 sums of the same costs, shifted by δ before the mean: exact to float32 rounding
    assert tight["C"] == pytest.approx([plain["C"][0] + 0.25, plain["C"][1] + 3], abs=1e-5)
    assert tight_before == plain_before


def test_reward_model_training_improves_accuracy(tmp_path, data_dir):
    out = run_train(tmp_path, data_dir, "--method=reward", "--steps=30", "--eval_every=0.1",
                    "--batch_size=16", "--micro_batch=16", "--lr=1e-2", "--dim=64", timeout=400)
    # App. A.1's "validate every 10 % of an epoch": 1,900 training pairs (5 % held out of 2,000) are
    # 118 batches of 16, so every ⌈11.8⌉ = 12 steps
    assert "val @ 12" in out and "val @ 24" in out and "val @ 11" not in out
    report = json.loads((tmp_path / "report.json").read_text())
    # the demo's informative preferences, from a random init (measured: 0.41 -> 0.96 on the 100
    # held-out pairs)
    assert report["val_accuracy_before"] < 0.6 and report["val_best_accuracy"] >= 0.9
    assert os.path.isfile(tmp_path / "best" / "model.pth")


def test_nonfinite_loss_or_reward_is_skipped_on_every_rank(tmp_path, data_dir):
    """A NaN task loss at the first task step and a NaN reward for one sample at the first
    constraint step, both on rank 0 only (injected by wrapping l3m.task_loss and rewards.costs):
    both ranks skip those two steps together, Ĉ is not poisoned (the next constraint step's Ĉ is its
    own finite batch mean, as a first Ĉ is), the other steps run and the weights stay finite."""
    script = tmp_path / "nan.py"
    script.write_text(f"""
import sys, torch.distributed as dist
sys.path.insert(0, {HERE!r})
import l3m, rewards, train
def first_call_on_rank0(f, poison):
    calls = []
    def wrapped(*a):
        out = f(*a)
        calls.append(1)
        return poison(out) if len(calls) == 1 and dist.get_rank() == 0 else out
    return wrapped
def nan_cost(c):
    c[0, 0] = float("nan")
    return c
l3m.task_loss = first_call_on_rank0(l3m.task_loss, lambda loss: loss * float("nan"))
rewards.costs = first_call_on_rank0(rewards.costs, nan_cost)
train.main(sys.argv[1:])
train.exit_now(0)  # as train.py's __main__: no teardown (train.exit_now)
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}",
           "--method=l3m", "--steps=8", "--constraint=length>=4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ONE_THREAD)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = ledger(tmp_path / "run")
    task, con = ([r for r in rows if r["kind"] == kind] for kind in ("task", "constraint"))
    assert len(task) >= 2 and len(con) >= 2
    assert [r["skipped"] for r in task] == [True] + [False] * (len(task) - 1)
    assert [r["skipped"]
            for r in con] == [True] + [False] * (len(con) - 1) and "C_hat" not in con[0]
    assert all(math.isfinite(r["C_hat"][0]) for r in con[1:])
    # the first Ĉ is the first finite batch's mean
    assert con[1]["C_hat"] == pytest.approx(con[1]["C"])
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


def test_short_schedule_warned_and_infeasible_constraint_reported(tmp_path, data_dir):
    """µ falling 1 -> 1e-6 in 4 steps is warned about at the start; a constraint no response can
    meet (length >= 1000 with 8 new tokens) runs to the end, reports itself violated with its C, and
    λ̂ stays finite. --stop_after at the last step is no time slice: the run finishes (report, final
    model), nothing to resume."""
    out = run_train(tmp_path, data_dir, "--method=l3m", "--steps=4", "--constraint=length>=1000",
                    "--stop_after=4")
    assert "warning: µ falls from 1 to 1e-06 in 4 steps" in out and "raise --mu_T" in out
    assert "--resume" not in out and (tmp_path / "final" / "model.pth").is_file()
    assert not (tmp_path / "ckpt").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    c = report["after"]["constraints"]["length>=1000"]
    assert c["C"] >= 1000 - 8 and c["verdict"] == "violated"
    assert all(math.isfinite(x) and x > 0 for x in report["lam_hat"])
    import train
    cfg = train.parse_config([])  # µ 1 -> 1e-6: ×1/1.15 per step is 1e6^(1/(T − 1)), T = 99.8 steps
    assert [train.schedule_too_short(cfg, T) for T in (4, 99, 100, 120)] == [True, True, False,
                                                                             False]


def test_reports_give_the_share_of_answers_violating_each_constraint():
    """task_report beside C ± se: the share of answers with b − r > 0, per constraint (for a chance
    constraint, 1 − P[the event]); format_comparison prints it. Lengths 10, 20, 30, 40 under
    length>=25 (b − r = 15, 5, −5, −15: two of four violate, C = 0) and length<=35 (−25, −15, −5, 5:
    one of four); an answer exactly at its bound (b − r = 0) does not violate it."""
    import types
    import train
    cons = [types.SimpleNamespace(name="length>=25", b=25.0),
            types.SimpleNamespace(name="length<=35", b=-35.0)]
    trainer = types.SimpleNamespace(constraints=cons)
    lengths = torch.tensor([10.0, 20.0, 30.0, 40.0])
    c = torch.stack([25.0 - lengths, lengths - 35.0], 1)  # (4, 2): b − r, r = ±length
    table = torch.cat([torch.ones(4, 1), lengths[:, None], torch.ones(4, 1), torch.zeros(4, 2),
                       torch.full((4, 1), math.nan), c], 1)
    report = train.task_report(trainer, table, "test", [])
    got = {name: (r["C"], r["violated_share"]) for name, r in report["constraints"].items()}
    assert got == {"length>=25": (0.0, 0.5), "length<=35": (-10.0, 0.25)}
    at_bound = torch.tensor([25.0, 25.0, 30.0, 40.0])  # two answers exactly at length 25
    c = torch.stack([25.0 - at_bound, at_bound - 35.0], 1)
    table = torch.cat([torch.ones(4, 1), at_bound[:, None], torch.ones(4, 1), torch.zeros(4, 2),
                       torch.full((4, 1), math.nan), c], 1)
    assert train.task_report(trainer, table, "test",
                             [])["constraints"]["length>=25"]["violated_share"] == 0.0
    text = train.format_comparison(report, report, "l3m")
    assert re.search(r"answers violating  length>=25 +50% +50%", text)
    assert re.search(r"answers violating  length<=35 +25% +25%", text)


def test_degenerate_answers_counted_on_a_closed_form_table():
    """rewards.degenerate on six answers whose kinds are known by construction (4-grams, 3
    repeats), then task_report's shares and fluency, and format_comparison's rows. Catches an empty
    answer that counts its EOS, a loop test that misses overlapping repeats or fires at 2, and cut
    read as ended."""
    import types
    import train
    eos = 0
    responses = [[eos],                          # empty: nothing before the EOS
                 [5, 6, 7, 8, eos],              # a plain short answer
                 [1, 2, 1, 2, 1, 2, 1, 2, eos],  # (1, 2, 1, 2) at 0, 2, 4: a loop, overlaps count
                 [1, 2, 3, 4, 1, 2, 3, 4, 9],    # (1, 2, 3, 4) twice, no EOS: cut, not a loop
                 [3] * 6,                        # (3, 3, 3, 3) three times and cut: both
                 []]                             # cut before any token (max_new_tokens at once)
    ended = [True, True, True, False, False, False]
    samples = R.Samples([[1]] * 6, responses, ended, [""] * 6, [""] * 6)
    expected = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1]],
                            dtype=torch.float32)
    assert torch.equal(R.degenerate(samples), expected)

    trainer = types.SimpleNamespace(constraints=[])
    ended_col = torch.tensor(ended, dtype=torch.float32)[:, None]
    fluency = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[:, None]  # mean 3.5, sd 1.8708
    table = torch.cat([torch.ones(6, 1), torch.ones(6, 1), ended_col, expected[:, :2], fluency], 1)
    report = train.task_report(trainer, table, "test", [])
    assert [report[f"{k}_share"] for k in ("empty", "loop", "cut")] == pytest.approx([2 / 6, 2 / 6,
                                                                                      0.5])
    assert report["fluency_mean"] == pytest.approx(3.5)
    assert report["fluency_se"] == pytest.approx(math.sqrt(3.5 / 6))  # sd² = 17.5/5, n = 6
    # every length is 1 here (column 2): one bin of all six answers, the others too small to report
    assert report["fluency_by_length"] == {"1": {"n": 6, "mean": pytest.approx(3.5),
                                                 "se": pytest.approx(math.sqrt(3.5 / 6))},
                                           "4": None, "8": None, "16": None, "32": None}
    text = train.format_comparison(report, report, "l3m")
    assert re.search(r"empty / looped / cut answers +33% / 33% / 50% +33% / 33% / 50%", text)
    assert re.search(r"fluency \(NLL under the judge\) +3.500 ± 0.764", text)


def test_real_model_table_compares_fluency_within_length_bins():
    """reproduce.py --real_model's table (smollm2.sh's summary) from task_report's statistics: the
    fluency of each length bin, with its count, beside the overall mean. Answers of lengths 2, 2, 5,
    5, 5 and 40 with NLLs 6, 4, 3, 2, 1 and 0.5: bins 1–3 (mean 5), 4–7 (mean 2) and 32+ (one
    answer: too few)."""
    import types
    import reproduce
    import train
    trainer = types.SimpleNamespace(constraints=[])
    lengths = torch.tensor([2.0, 2, 5, 5, 5, 40])[:, None]
    fluency = torch.tensor([6.0, 4, 3, 2, 1, 0.5])[:, None]
    table = torch.cat([torch.ones(6, 1), lengths, torch.ones(6, 1), torch.zeros(6, 2), fluency], 1)
    report = train.task_report(trainer, table, "test", [])
    text = reproduce.real_model_table({"sft": report, "l3m": report}, "test split")
    assert re.search(r"answers of 1–3 +5\.00 ± 1\.00 \(2\) +5\.00 ± 1\.00 \(2\)", text)
    assert re.search(r"answers of 4–7 +2\.00 ± 0\.58 \(3\) ", text)  # sd 1, n 3
    assert re.search(r"answers of 8–15 +— +—", text) and re.search(r"answers of 32\+ +— +—", text)


def test_threads_are_chosen_by_the_flag_the_environment_or_core_share(monkeypatch):
    """set_threads: --threads sets torch's count; OMP_NUM_THREADS (torchrun's 1) leaves it alone;
    with neither, CoreShare adapts it, starting from torch's one thread per core. Catches a
    CoreShare that overrides the user's choice, one left over from an earlier run in the process, or
    none where train.py chooses."""
    import train
    before = torch.get_num_threads()
    monkeypatch.setattr(train, "_CORE_SHARE", None)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        train.set_threads(train.parse_config([]))
        assert train._CORE_SHARE is None and torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        train.set_threads(train.parse_config(["--threads=3"]))
        assert train._CORE_SHARE is None and torch.get_num_threads() == 3
        train.set_threads(train.parse_config([]))
        assert train._CORE_SHARE.cores == 3
        train.set_threads(train.parse_config(["--threads=2"]))  # a second run in the same process
        assert train._CORE_SHARE is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_core_share_runs_on_the_cores_other_programs_leave(monkeypatch):
    """CoreShare on 4 cores, fed clocks (wall s, the machine's busy CPU s, this process's CPU s):
    others hold round((Δbusy − Δown)/Δwall) cores, torch runs on the rest and on at least one, and a
    look of under 0.2 s waits for the next. Catches this process's own time counted as others', a
    floor or ceil for the round, a short look acted on, and zero threads."""
    import train
    clocks = iter([(0.0, 0.0, 0.0),
                   (1.0, 2.0, 2.0),    # others 0: 4 threads
                   (2.0, 4.0, 3.1),    # others 0.9: 3
                   (2.1, 4.2, 3.1),    # a look of 0.1 s: still 3
                   (3.0, 7.0, 3.4),    # others 2.7 over the 1 s since the last look acted on: 1
                   (4.0, 11.0, 3.5),   # others 3.9: all 4 cores held, yet 1
                   (5.0, 12.0, 4.6),   # others −0.1 (ticks round down): 4
                   (6.0, 14.0, 6.2)])  # others 0.4: 4
    monkeypatch.setattr(train.CoreShare, "clocks", staticmethod(lambda: next(clocks)))
    before = torch.get_num_threads()
    share = train.CoreShare(4)
    try:
        seen = []
        for _ in range(7):
            share.adapt()
            seen.append(torch.get_num_threads())
        assert seen == [4, 3, 3, 1, 1, 4, 4]
    finally:
        torch.set_num_threads(before)


def test_flag_values_parse_or_fail_as_usage_errors(capsys):
    import train
    cfg = train.parse_config(["--val=0.5", "--test=12", "--resume=tRUE", "--overwrite=false"])
    # fractions, any case
    assert (cfg.val, cfg.test, cfg.resume, cfg.overwrite) == (0.5, 12.0, True, False)
    with pytest.raises(SystemExit) as e:
        train.parse_config(["--resume=maybe"])
    assert e.value.code == 2
    assert "argument --resume: invalid true_false value: 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--lr=-1"], "--lr=-1.0 must be > 0"),
    (["--batch_size=0"], "--batch_size=0 must be > 0"),
    (["--micro_batch=0"], "--micro_batch=0 must be > 0"),
    (["--rollout_batch=-8"], "--rollout_batch=-8 must be >= 0"),
    (["--constraint_every=1"], r"--constraint_every=1 must be 0 \(the coin\) or >= 2"),
    (["--margin=0.1"], r"--margin=\['0.1'\] must be given once per --constraint \(2 of them\)"),
    (["--margin=0.1", "--margin=-1"], "--margin=.* must be a finite number >= 0 each"),
    (["--margin=0.1", "--margin=nan"], "--margin=.* must be a finite number >= 0 each"),
    (["--batch_size=1", "--micro_batch=1", "--baseline=loo"],
     "--baseline=loo must be none with one rollout"),
    (["--batch_size=16", "--micro_batch=5"],
     "--batch_size=16 must be a multiple of --micro_batch=5"),
    (["--top_p=1.5"], r"--top_p=1.5 must be in \(0, 1\]"),
    (["--temperature=-0.5"], "--temperature=-0.5 must be >= 0"),
    (["--mu_T=2"], r"--mu_T=2.0 must be in \(0, --mu_0=1.0\): µ decays"),
    (["--ema_alpha=0"], "--ema_alpha=0.0 must be in"),
    (["--method=mm", "--eta_lam=0"], "--eta_lam=0.0 must be > 0"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 must be > 0"),
    (["--warmup=1.5"], r"--warmup=1.5 must be in \[0, 1\)"),
    (["--epochs=0"], "--epochs=0.0 must be > 0 \\(or --steps > 0\\)"),
    (["--method=ppo"], "--method=ppo must be sft, l3m, mm or reward"),
    (["--device=tpu"], "--device=tpu must be auto, cpu or cuda"),
    (["--chat_template=zephyr"], "--chat_template=zephyr must be one of plain, llama2, chatml"),
    (["--chat_template=chatml"],
     "--chat_template=chatml needs <.im_start.> and <.im_end.> .* the demo model has none"),
    (["--system_prompt=Be brief."],
     "--system_prompt=Be brief. must be empty with --chat_template=plain"),
    (["--constraint=length>=inf"],
     "cannot read 'length>=inf' \\(the threshold must be a finite number\\)"),
    (["--constraint=length>=nan"], "the threshold must be a finite number"),
    (["--constraint=length=>5"], "length=>5"),
    (["--reward_model=helpful"], "expected NAME=FOLDER"),
    (["--resume=True"], "--resume: the checkpoint .*state.pt' does not exist"),
])
def test_bad_flag_is_one_error_line_and_nothing_written(tmp_path, capsys, flags, message):
    import train
    with pytest.raises(SystemExit) as e:
        train.main([f"--out_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'data'}", *flags])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.err == "" and re.fullmatch(f"error: .*{message}.*\n",
                                                                out.out), out
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_finished_run_not_clobbered_and_resume_with_other_flags_refused(tmp_path):
    """A run already in --out_dir is refused unless --resume or --overwrite; resuming with a flag
    that shapes the run changed (the constraints, the batch) is refused, naming each difference."""
    import train
    (tmp_path / "ledger.jsonl").write_text("")
    argv = [f"--out_dir={tmp_path}", "--constraint=length>=5", "--batch_size=8", "--micro_batch=8"]
    with pytest.raises(train.ConfigError, match="holds a run: continue it with --resume=True, "
                       "replace it with "):
        train.check_config(train.parse_config(argv))
    train.check_config(train.parse_config(argv + ["--overwrite=True"]))
    (tmp_path / "ckpt").mkdir()
    torch.save({"config": dataclasses.asdict(train.parse_config(argv))},
               tmp_path / "ckpt" / "state.pt")
    train.check_config(train.parse_config(argv + ["--resume=True", "--stop_after=9",
                                                  "--micro_batch=4"]))
    with pytest.raises(train.ConfigError) as e:
        train.check_config(train.parse_config(argv[:1] + ["--constraint=length>=6",
                                                          "--batch_size=16", "--micro_batch=8",
                                                          "--resume=True"]))
    assert str(e.value) == ("--resume with flags other than the checkpoint's: "
                            "--constraint=['length>=6'] (the checkpoint's: ['length>=5']), "
                            "--batch_size=16 (the checkpoint's: 8)")
    # killed between atomic_folder's two renames: ckpt is gone, the previous checkpoint whole
    # beside it
    os.rename(tmp_path / "ckpt", tmp_path / "ckpt.old123")
    with pytest.raises(train.ConfigError, match="ckpt was being replaced .* whole in "
                       ".*ckpt.old123: rename it"):
        train.check_config(train.parse_config(argv + ["--resume=True"]))


def test_bad_config_stops_every_rank_with_one_message(tmp_path):
    """Under torchrun both ranks refuse the flag before any collective; only rank 0 prints (the
    error lines of every kind of bad flag are tested in-process, below)."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", os.path.join(HERE, "train.py"),
                        f"--out_dir={tmp_path}", "--init=/no/such/ckpt"],
                       capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert p.returncode != 0
    errors = [line for line in p.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search("--init checkpoint .* '/no/such/ckpt/args.json' does not exist", errors[0])


def test_weight_decay_spares_the_norms():
    """AdamW's groups (transformers' Trainer rule): decay on every matrix, embedding and output
    included, none on the RMSNorm weights. With zero gradients a step is the decoupled decay alone:
    matrices shrink by exactly (1 − lr·wd), norms do not move."""
    import train
    model = tiny_model()
    groups = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and "tok_embeddings.weight" in decayed
    assert "output.weight" in decayed and not any("norm" in n for n in decayed)
    assert sorted(names[id(p)] for p in groups[1]["params"]) == sorted(n for n in names.values()
                                                                       if "norm" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] * (1 - 0.5 * 0.1 if "norm" not in n else 1.0), rtol=0,
                              atol=1e-7), n


def test_every_flag_has_help(capsys):
    """`python train.py --help` says what every flag means, not only its default."""
    import train
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also after hyphens
    helps = [f.metadata["help"] for f in dataclasses.fields(train.Config)]
    assert len(set(helps)) == len(helps)  # no shared boilerplate standing in for a meaning
    for f, help in zip(dataclasses.fields(train.Config), helps):
        assert len(help.split()) >= 3, f.name
        assert f"--{f.name}" in out and "".join(help.split()) in out, f.name


def test_demo_pipeline_end_to_end(tmp_path, data_dir):
    """`python train.py` with no flags, scaled down: the demo base is pretrained once and
    cached, L3M runs from it, and the report is complete and agrees with itself (flags match the
    numbers they summarise)."""
    small = ["--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--base_epochs=0.1",
             "--steps=6", "--val=8", "--test=8", "--max_new_tokens=16", "--eval_every=0",
             "--ckpt_every=0", "--show=8"]
    cache = tmp_path / "cache"
    shutil.copytree(data_dir, cache)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--data_dir={cache}", *small]
    first = subprocess.run(cmd + [f"--out_dir={tmp_path / 'a'}"], capture_output=True, text=True,
                           env=ONE_THREAD, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    import train
    assert "pretraining the demo base model" in first.stdout
    assert (cache / train.DEMO_BASE / "args.json").is_file()
    again = train_here(cmd[2:] + [f"--out_dir={tmp_path / 'b'}", "--eval_before=False"])
    assert "pretraining the demo base model" not in again  # cached
    # the test split only after
    assert "before" not in json.loads((tmp_path / "b" / "report.json").read_text())
    assert "before" in first.stdout and "after (l3m)" in first.stdout and "prompt: " in first.stdout

    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["config"]["constraint"] == ["length>=20", "length<=35"]
    for when in ("before", "after"):
        r = report[when]
        # --show=8: every test response, to check the statistics
        assert r["n"] == 8 and len(r["samples"]) == 8
        lengths = np.array([s["length"] for s in r["samples"]], dtype=float)
        assert r["length_mean"] == pytest.approx(lengths.mean())
        # of the mean over 8 responses
        assert r["length_se"] == pytest.approx(lengths.std(ddof=1) / np.sqrt(8))
        assert r["length_q1"] <= r["length_median"] <= r["length_q3"]
        low, high = r["constraints"]["length>=20"], r["constraints"]["length<=35"]
        assert low["reward_mean"] == pytest.approx(r["length_mean"]) and low["b"] == 20
        assert high["reward_mean"] == pytest.approx(-r["length_mean"]) and high["b"] == -35
        for c in (low, high):
            assert c["C"] == pytest.approx(c["b"] - c["reward_mean"])
            assert c["satisfied"] == (c["C"] <= 0)
            assert c["se"] == pytest.approx(r["length_se"]) and c["verdict"] == R.verdict(c["C"],
                                                                                          c["se"])
        assert (low["satisfied"] and high["satisfied"]) == (20 <= r["length_mean"] <= 35)
    assert len(report["lam_hat"]) == 2 and all(x >= 0 for x in report["lam_hat"])


# -----------------------------------------------------------------------------
# reproduce.py: which mean rewards a policy choosing among given responses can reach (Fig.
# 3 feasibility)


def test_pareto_frontier_and_margin_on_a_hand_made_case():
    import reproduce
    # prompts with responses {(1, 0), (0, 1)} and {(1, 0), (0, 2)}: the second switches at weight w
    # = 2/3 on r₁, the first at 1/2, so the averages of the picks are (0, 1.5), (0.5, 1) and (1, 0)
    scores = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0]])]
    assert np.allclose(reproduce.pareto_frontier(scores), [[0, 1.5], [0.5, 1], [1, 0]])
    # the same prompt twice: the average of a segment with itself is that segment, no new vertex
    assert np.allclose(reproduce.pareto_frontier([scores[0]] * 2), [[0, 1], [1, 0]])
    f = np.array([[0.0, 1.0], [1.0, 0.0]])
    # (0.5, 0.5) clears both by 0.5
    assert reproduce.frontier_margin(f, 0.0, 0.0) == pytest.approx(0.5)
    # above the diagonal: infeasible
    assert reproduce.frontier_margin(f, 0.6, 0.6) == pytest.approx(-0.1)
    # at (0.05, 0.95), inside a segment
    assert reproduce.frontier_margin(f, 0.0, 0.9) == pytest.approx(0.05)
    assert [(a, b, ok) for a, b, ok, _ in reproduce.feasibility(f, [(0.0, 0.0), (0.6, 0.6)])] == \
        [(0.0, 0.0, True), (0.6, 0.6, False)]


def test_frontier_margin_equals_its_dual_on_random_responses():
    """max over the reachable set of min(r₁ − a, r₂ − b) = min over w ∈ [0, 1] of h(w) − w·a − (1 −
    w)·b, with h(w) = mean over prompts of the best w·r₁ + (1 − w)·r₂ (minimax: the set is convex,
    the objective bilinear). The dual needs no frontier, so it checks pareto_frontier and
    frontier_margin together. The frontier comes from finitely many weights and may miss a vertex,
    so its margin is a lower bound: seen 6e-6 below the dual with 2001 weights."""
    import reproduce
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=(int(rng.integers(2, 7)), 2)) * [3.0, 1.0] for _ in range(5)]
    w = np.linspace(0, 1, 20001)[:, None]
    h = np.mean([(w * s[:, 0] + (1 - w) * s[:, 1]).max(1) for s in scores], 0)  # (W,)
    frontier = reproduce.pareto_frontier(scores, n_weights=2001)
    for a, b in [(0.0, 0.0), (1.0, -0.5), (-1.0, 1.0), (3.0, 3.0)]:
        dual = (h - w[:, 0] * a - (1 - w[:, 0]) * b).min()
        assert dual - 1e-4 <= reproduce.frontier_margin(frontier, a, b) <= dual + 1e-12


def test_reproduce_reuses_a_run_only_with_its_flags(tmp_path, monkeypatch):
    """reproduce.train keys its cache by the flags: the same flags reuse the report, other flags (a
    --quick run's SFT model, evaluated without "before", then a full run in the same --out) run
    train.py again, and so does a report from before flags.json. A cache keyed by the report alone
    fails the full run with KeyError: 'before'."""
    import reproduce
    runs = []

    def fake_run(cmd, **kwargs):  # train.py's stand-in: a report that records its flags
        runs.append(cmd)
        out = next(x.split("=", 1)[1] for x in cmd if x.startswith("--out_dir="))
        Path(out).mkdir(parents=True, exist_ok=True)
        report = {"flags": cmd[2:], **({"before": {}} if "--eval_before=True" in cmd else {})}
        Path(out, "report.json").write_text(json.dumps(report))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    out = str(tmp_path / "sft")
    quick = reproduce.train(out, "--method=sft", "--eval_before=False", data_dir="d")
    assert "before" not in quick and len(runs) == 1
    assert reproduce.train(out, "--method=sft", "--eval_before=False",
                           data_dir="d") == quick and len(runs) == 1
    full = reproduce.train(out, "--method=sft", "--eval_before=True", data_dir="d")
    assert "before" in full and len(runs) == 2
    os.remove(tmp_path / "sft" / "flags.json")  # a report cached before flags.json existed
    reproduce.train(out, "--method=sft", "--eval_before=True", data_dir="d")
    assert len(runs) == 3


def test_reproduce_fig3_chooses_on_the_validation_split(tmp_path, monkeypatch):
    """fig3 end to end with train.py replaced by a stand-in whose reports are set by the flags, and
    whose test split disagrees with its validation split. Every choice must follow the validation
    split: the grid sits on SFT's validation rewards, MM's η_λ is the one that meets its point there
    (then runs on every seed), and the recipe chosen is the one that meets it there. A margin run
    trains on raised thresholds but is judged on the grid's; the 800-step control and the
    leave-one-out runs get their own folders and flags."""
    import reproduce

    flags_of = {}

    def fake_train(out, *flags, data_dir):
        os.makedirs(out, exist_ok=True)
        flags_of[os.path.basename(out)] = flags
        f = dict(x.lstrip("-").split("=", 1) for x in flags if "=" in x
                 and not x.startswith("--constraint"))
        if f["method"] == "reward":
            return {"test_accuracy": 0.9}
        cons = [x.split("=", 1)[1] for x in flags if x.startswith("--constraint")]
        b = [float(c.split(">=")[1]) for c in cons]
        if f["method"] == "sft":  # (−5, −10) on the validation split, (−6, −11) on the test split
            val, test = [-5.0, -10.0], [-6.0, -11.0]
        # η_λ = 1 meets its point on the validation split only, 0.1 on the test only
        elif f["method"] == "mm":
            val = [x - 0.1 * (f["eta_lam"] != "1.0") for x in b]
            test = [x - 0.1 * (f["eta_lam"] == "1.0") for x in b]
        else:
            # L3M lands on its thresholds on the test split; on the validation split 0.1 short,
            # 0.01 at 40 steps
            val, test = [x - (0.01 if f["steps"] == "40" else 0.1) for x in b], b
        (Path(out) / "ledger.jsonl").write_text(json.dumps({"kind": "constraint", "C": [0, 0],
                                                            "C_hat": [0, 0], "lam": [1, 1]}) + "\n")

        def split(got, n, se):
            return {"n": n, "perplexity_mean": 0.2, "perplexity_std": 0.01, "constraints": {
                c: {"b": t, "reward_mean": g, "C": t - g, "se": se, "violated_share": 0.5}
                for c, t, g in zip(cons, b, got)}}
        return {"val": split(val, 50, 0.02), "after": split(test, 200, 0.01)}
    monkeypatch.setattr(reproduce, "train", fake_train)
    (tmp_path / "fig3").mkdir()  # a cached feasibility run: one frontier vertex, (−3, −9)
    frontier = {"frontiers": {"any+policy": [[-3.0, -9.0]]}}
    (tmp_path / "fig3" / "feasibility.json").write_text(json.dumps(frontier))
    table, summary = reproduce.fig3(str(tmp_path), [(1.0, 0.5)], [0, 1], (0.1, 1.0), 2.0, 10, 5,
                                    "unused", [], with_feasibility=True, margin_steps=40, loo=True)
    # the grid on SFT's validation rewards; a standard error of a 200-prompt mean from 50 prompts'
    # 0.02: 0.01
    assert summary["sft"]["rewards"] == [-5.0,
                                         -10.0] and summary["sft"]["se"] == pytest.approx([0.01,
                                                                                           0.01])
    steps = {k: next(x for x in v if x.startswith("--steps=")) for k, v in flags_of.items()
             if "rm_" not in k}
    long = {f"l3m_margin2_-4.0_-9.5_s{s}_40steps" for s in (0, 1)} | {f"l3m_-4.0_-9.5_s{s}_40steps"
                                                                      for s in (0, 1)}
    assert {k for k, v in steps.items() if v == "--steps=40"} == long
    assert {k for k, v in flags_of.items() if "--baseline=loo" in v} == {f"l3m_loo_-4.0_-9.5_s{s}"
                                                                         for s in (0, 1)}
    # a validation of the final model
    assert all(f"--eval_every={v[8:]}" in flags_of[k] for k, v in steps.items())
    # (−4, −9.5) clears the vertex by 0.5 (the smaller slack); raised by 0.02 each, by 0.48
    assert summary["feasibility_margin"]["-4.0, -9.5"] == pytest.approx((0.5, 0.48))
    assert summary["best_eta_lam"] == 1.0 and summary["recipe"] == ("l3m+margin", 40)
    runs = {(r["method"], r["seed"], r["eta_lam"], r["steps"]): r for r in summary["runs"]}
    assert set(runs) == {(m, s, None, n) for m, n in [("l3m", 10), ("l3m+loo", 10),
                                                      ("l3m+margin", 10), ("l3m", 40),
                                                      ("l3m+margin", 40)] for s in (0, 1)} | {("mm",
                                                                                               0,
                                                                                               0.1,
                                                                                               10),
                                                                                              ("mm",
                                                                                               0,
                                                                                               1.0,
                                                                                               10),
                                                                                              ("mm",
                                                                                               1,
                                                                                               1.0,
                                                                                               10)}
    # trained on thresholds raised by 2 × 0.01, judged on (−4, −9.5)
    margin = runs["l3m+margin", 0, None, 10]
    assert (margin["informative"], margin["a"]) == (pytest.approx(-3.98), -4.0)
    assert [v["C"] for v in margin["verdicts"]] == pytest.approx([-0.02, -0.02])
    assert [v["C"] for v in margin["val_verdicts"]] == pytest.approx([0.08, 0.08])
    assert "| (−4.00, −9.50) |" not in table and "| (-4.00, -9.50) |" in table and "2/2 ✓" in table
    chosen = "raised by 2 standard errors (0.02, 0.02), 40 steps (chosen)"
    assert f"{chosen} | 2/2 ✓ | 2/2 ✓ | 2/2 ✓ |" in table


def test_reproduce_verdicts_and_ledger_summary(tmp_path):
    """A run's verdicts (worst constraint wins; a margin run judged on the untightened thresholds)
    and the ledger summary (second half of the constraint steps only), against hand computations."""
    import reproduce
    report = {"after": {"constraints": {"a>=1": {"C": -0.1, "se": 0.2, "reward_mean": 1.1},
                                        "b>=2": {"C": 0.3, "se": 0.2, "reward_mean": 1.7}}}}
    v = reproduce.verdicts(report)
    assert [x["verdict"] for x in v] == ["satisfied",
                                         "within noise"] and reproduce.overall(v) == "within noise"
    # C = b − mean reward: −0.6 and 0.8 = 4 se
    v = reproduce.verdicts(report, thresholds=[0.5, 2.5])
    assert [x["C"] for x in v] == pytest.approx([-0.6, 0.8]) and reproduce.overall(v) == "violated"
    assert reproduce.counts([{"verdicts": v}, {"verdicts": v[:1]}], 3) == "1/3 ✓, 1 ✗"
    steps = [{"kind": "task"}] + [{"kind": "constraint", "C": [c, -c], "C_hat": [0, 0], "lam": lam}
                                  for c, lam in [(9.0, [1, 1]), (9.0, [1, 1]), (1.0, [1e-4, 1.0]),
                                                 (3.0, [0.5, 1.0])]]
    steps.append({"kind": "constraint", "skipped": True})  # a non-finite reward: no C, not counted
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    summary = reproduce.ledger_summary(str(tmp_path))
    assert summary["late_C"] == pytest.approx([2.0, -2.0]) and summary["one_sided_share"] == 0.5
