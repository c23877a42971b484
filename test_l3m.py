"""Tests: the model against Hugging Face and itself, the method on toy problems with exact answers.

Run: python -m pytest -q test_l3m.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M

HERE = os.path.dirname(os.path.abspath(__file__))

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
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=n_kv_heads, vocab_size=vocab_size, rms_norm_eps=1e-5,
                                   rope_theta=500000.0, max_position_embeddings=128, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    # HF initialises norms to 1; random norm weights make the test see a swapped norm.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


# float32 logits of a 2-layer model are O(1); the two implementations sum in different orders, so they
# agree to ~1e-6. 1e-4 leaves room for that and still catches any wrong permutation or norm (errors O(0.1)).
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


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_loads(tmp_path, n_shards):
    """A Meta-layout release (params.json + consolidated.NN.pth, model-parallel shards) converts exactly."""
    args = tiny_args(n_kv_heads=2)
    ref = M.Transformer(args).init_weights(6).eval()
    sd = ref.state_dict()
    M.write_meta(sd, args, str(tmp_path / "meta"))
    if n_shards == 2:  # split as Meta's model parallelism does: columns for wo/w2 and LLaMA-1/2's embedding
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
    """Prefill + one token at a time with left padding gives the logits of the full, unpadded forward."""
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
        step_logits = [model(padded, cache)[:, -1]]
        for t in range(n_new - 1):
            step_logits.append(model(torch.tensor([[c[t]] for c in conts]), cache)[:, -1])
        for b in range(B):
            full = model(torch.tensor([prompts[b] + conts[b]]))[0]  # (T, V)
            for t in range(n_new):
                ref = full[len(prompts[b]) - 1 + t]
                assert (step_logits[t][b] - ref).abs().max().item() <= ATOL


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> mass before each: 0, 0.4, 0.7, 0.85, 0.95
    kept = M.top_p_filter(probs, 0.8)
    assert torch.equal(kept, torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]))
    assert torch.equal(M.top_p_filter(probs, 1.0), probs)
    g = torch.Generator().manual_seed(0)
    logits = probs.log().expand(20000, 5)
    draws = M.sample_top_p(logits, 1.0, 0.8, g)
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[0] == 0 and counts[2] == 0  # never outside the nucleus
    # Inside it, frequencies follow the renormalised nucleus: 0.4/0.85 etc. The binomial standard error
    # with n = 20000 is ≤ 0.0036; 0.015 is four of them.
    assert torch.allclose(counts / 20000, kept[0].double() / 0.85, atol=0.015)
    # p = 1 samples the whole distribution unchanged.
    full = torch.bincount(M.sample_top_p(logits, 1.0, 1.0, g), minlength=5).double() / 20000
    assert torch.allclose(full, probs[0].double(), atol=0.015)


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
    """Greedy decoding of this model says token 10 + step, except EOS (2) at each row's scripted step."""

    def __init__(self, eos_step, prompt_len):
        super().__init__(tiny_args())
        self.eos_step, self.prompt_len = eos_step, prompt_len

    def forward(self, tokens, cache=None):
        super().forward(tokens, cache)
        B, T = tokens.shape
        n = cache.length - self.prompt_len  # tokens generated once this call's logits are sampled
        logits = torch.zeros(B, T, self.args.vocab_size)
        for b in range(B):
            logits[b, -1, 2 if n == self.eos_step[b] else 10 + n] = 1.0
        return logits


def test_generate_stops_each_row_at_its_eos():
    model = Scripted([1, 3, 99], prompt_len=4).eval()
    out, ended = M.generate(model, [[1, 4, 5, 6], [1, 7], [1]], max_new_tokens=5, eos_id=2, temperature=0)
    # the EOS is part of the response, nothing after it; the third row never ends
    assert out == [[10, 2], [10, 11, 12, 2], [10, 11, 12, 13, 14]]
    assert ended == [True, True, False]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("tok") / "tok"
    text = ["the quick brown fox jumps over the lazy dog", "a short answer", "a much longer answer with words"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(path), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   byte_fallback=False, minloglevel=2)
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
    M.save_checkpoint(model, good, args, sp_model)
    loaded, tok = M.load_model(good)
    assert tok.vocab_size == 60 and torch.equal(loaded.output.weight, model.output.weight)

    sd = model.state_dict()
    del sd["layers.1.feed_forward.w3.weight"]
    M.save_checkpoint(model, str(tmp_path / "missing"), args, state_dict=sd)
    with pytest.raises(M.CheckpointError, match=r"missing key 'layers.1.feed_forward.w3.weight'"):
        M.load_model(str(tmp_path / "missing"))

    sd = model.state_dict()
    sd["layers.0.attention.wk.weight"] = sd["layers.0.attention.wk.weight"][:8]
    M.save_checkpoint(model, str(tmp_path / "shape"), args, state_dict=sd)
    with pytest.raises(M.CheckpointError, match=r"'layers.0.attention.wk.weight' has shape \(8, 64\).*\(32, 64\)"):
        M.load_model(str(tmp_path / "shape"))

    other = tiny_args(vocab_size=97)
    M.save_checkpoint(M.Transformer(other), str(tmp_path / "vocab"), other, sp_model)
    with pytest.raises(M.CheckpointError, match=r"60 pieces but args.json says vocab_size=97"):
        M.load_model(str(tmp_path / "vocab"))

    with pytest.raises(M.CheckpointError, match="neither Meta"):
        M.convert(str(tmp_path), str(tmp_path / "x"))


def test_save_checkpoint_replaces_atomically(tmp_path):
    args = tiny_args()
    folder = str(tmp_path / "ckpt")
    M.save_checkpoint(M.Transformer(args).init_weights(0), folder, args)
    second = M.Transformer(args).init_weights(1)
    M.save_checkpoint(second, folder, args)
    loaded, _ = M.load_model(folder)
    assert torch.equal(loaded.output.weight, second.output.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind


# -----------------------------------------------------------------------------
# train.py: runs as subprocesses, one process or two (torchrun, gloo)

TINY = ["--init=scratch", "--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--batch_size=8",
        "--micro_batch=4", "--val=8", "--test=8", "--max_new_tokens=8", "--eval_every=0", "--ckpt_every=0",
        "--lr=3e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import data
    folder = tmp_path_factory.mktemp("demo")
    data.prepare_demo(str(folder))
    return str(folder)


def run_train(out_dir, data_dir, *flags, nproc=1, timeout=240):
    cmd = [sys.executable, os.path.join(HERE, "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(HERE, "train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd + TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def ledger(out_dir, drop=("t_sample", "t_train")):
    with open(os.path.join(out_dir, "ledger.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "final", "model.pth"), weights_only=True)


def test_two_processes_match_one(tmp_path, data_dir):
    """Two ranks (gloo) give the losses and parameters of one process on the same global batch.

    Proves the shared coin, the global Ĉ, the rollouts and the gradient averaging. Rollouts sample with
    one generator per row keyed by the row's global index, so they do not depend on the split over ranks.
    The two runs differ only in float summation order (micro-batches of 4 rows on each rank instead of
    two on one rank; reductions over ranks), ~1e-7 relative per step: 1e-5 covers 6 Adam steps.
    """
    flags = ["--method=l3m", "--steps=6", "--constraint=length>=6", "--constraint=length<=7"]
    run_train(tmp_path / "one", data_dir, *flags)
    run_train(tmp_path / "two", data_dir, *flags, nproc=2)
    one, two = ledger(tmp_path / "one"), ledger(tmp_path / "two")
    assert {r["kind"] for r in one} == {"task", "constraint"}
    for a, b in zip(one, two):
        assert a["kind"] == b["kind"] and a.get("len_mean") == b.get("len_mean")
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        for key in ("C", "C_hat", "lam"):
            if a["kind"] == "constraint":
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5


def test_resume_continues_exactly(tmp_path, data_dir):
    flags = ["--method=l3m", "--steps=6", "--constraint=length>=6"]
    run_train(tmp_path / "straight", data_dir, *flags)
    run_train(tmp_path / "halves", data_dir, *flags, "--ckpt_every=3", "--stop_after=3")
    run_train(tmp_path / "halves", data_dir, *flags, "--ckpt_every=3", "--resume=True")
    assert ledger(tmp_path / "straight") == ledger(tmp_path / "halves")
    w1, w2 = final_weights(tmp_path / "straight"), final_weights(tmp_path / "halves")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_rollouts_of_different_lengths_do_not_hang(tmp_path):
    """Rank 0's rows end at once, rank 1's never: sampling on gathered weights runs no collective, so the
    ranks decode different numbers of steps and still meet at the next training step."""
    script = tmp_path / "hang.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {HERE!r})
import train, model as M
cfg = train.parse_config(["--init=scratch", "--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1"])
rank, world, device = train.setup_distributed("cpu")
model, args = train.build_model(cfg, device, "scratch", tokenizer_vocab=50)
with train.gathered(model):
    first = model(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()
    eos = first if rank == 0 else 50  # rank 1: an id the model never emits
    out, ended = M.generate(model, [[1, 2, 3]] * 2, max_new_tokens=40, eos_id=eos, temperature=0)
print(rank, [len(o) for o in out], flush=True)
loss = model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).mean()
loss.backward()
dist.destroy_process_group()
""")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 [1, 1]" in p.stdout and "1 [40, 40]" in p.stdout


@pytest.mark.parametrize("method", ["sft", "mm"])
def test_methods_run_end_to_end(tmp_path, data_dir, method):
    run_train(tmp_path, data_dir, f"--method={method}", "--steps=4", "--constraint=length>=6")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["before"]["n"] == report["after"]["n"] == 8
    assert report["after"]["perplexity_mean"] < report["before"]["perplexity_mean"]
    assert M.load_model(str(tmp_path / "final"))[1] is not None  # model.py's format, tokenizer included


def test_reward_model_training_improves_accuracy(tmp_path, data_dir):
    run_train(tmp_path, data_dir, "--method=reward", "--steps=30", "--eval_every=10", "--batch_size=16",
              "--micro_batch=16", "--lr=1e-2", "--dim=64", timeout=400)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["val_best_accuracy"] > report["val_accuracy_before"] + 0.1
    assert os.path.isfile(tmp_path / "best" / "model.pth")


def test_nonfinite_loss_is_skipped_on_every_rank(tmp_path, data_dir):
    run_train(tmp_path, data_dir, "--method=sft", "--steps=3", "--debug_nan_step=1", nproc=2)
    rows = ledger(tmp_path)
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path).values())
