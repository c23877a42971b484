"""Benchmark model.py against transformers.LlamaForCausalLM on the same weights, side by side in one run.

    python bench.py                 # dim 512, 8 layers, 8 heads, 4 kv heads, vocab 32000; float32, 2 threads
    python bench.py --threads 16 --device cuda --dtype bfloat16

Prints times and ratios for (1) forward+backward of a batch 8 x 256 and (2) sampling 128 new tokens for
a batch of 8 with top-p 0.9 (both sides sample, no early stop: EOS is an id the model never emits).
Each measurement is the median of --repeats runs after one warm-up, ours and theirs interleaved so that
machine noise hits both alike.
"""
import argparse
import statistics
import time

import torch

import model as M


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--logit_scale", type=float, default=1.0,
                   help="scale the output layer: random weights give a nearly flat next-token distribution "
                        "(a huge nucleus); ~10 gives a peaked one, as a trained model's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.py compares against Hugging Face: pip install transformers")
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    cfg = transformers.LlamaConfig(hidden_size=a.dim, intermediate_size=M.ModelArgs(dim=a.dim).hidden_dim,
                                   num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                                   num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                                   max_position_embeddings=a.seq_len + a.new_tokens + a.prompt_len,
                                   bos_token_id=1, eos_token_id=a.vocab_size + 1, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(a.device, dtype)
    with torch.no_grad():
        hf.lm_head.weight *= a.logit_scale
    args = M.ModelArgs.from_hf(cfg.to_dict())
    ours = M.Transformer(args).to(a.device, dtype)
    ours.load_state_dict(M.hf_to_meta(hf.state_dict(), args), strict=True)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: {args}\n{n_params / 1e6:.1f}M parameters, {a.device} {a.dtype}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        probs = torch.softmax(ours(torch.randint(0, a.vocab_size, (a.batch, a.prompt_len), device=a.device)).float(), -1)
    nucleus = (M.top_p_filter(probs.flatten(0, 1), 0.9) > 0).sum(-1).float().mean().item()
    print(f"logit scale {a.logit_scale}: the 0.9-nucleus holds {nucleus:.0f} of {a.vocab_size} tokens on average")

    x = torch.randint(0, a.vocab_size, (a.batch, a.seq_len), device=a.device)

    def train_ours():
        ours(x).float().logsumexp(-1).mean().backward()

    def train_hf():
        hf(x).logits.float().logsumexp(-1).mean().backward()

    prompts = torch.randint(3, a.vocab_size, (a.batch, a.prompt_len), device=a.device)

    def sample_ours():
        g = torch.Generator(a.device).manual_seed(0)
        out, _ = M.generate(ours, prompts.tolist(), a.new_tokens, eos_id=a.vocab_size + 1, top_p=0.9, generator=g)
        assert all(len(o) == a.new_tokens for o in out)

    def sample_hf():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_p=0.9,
                              top_k=None, temperature=1.0, max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens)
        assert out.shape[1] == a.prompt_len + a.new_tokens

    rows = []
    for name, f_ours, f_hf in (("forward+backward", train_ours, train_hf), ("sample", sample_ours, sample_hf)):
        f_ours(), f_hf()  # warm-up
        t_ours, t_hf = [], []
        for _ in range(a.repeats):
            t_ours.append(timed(f_ours, sync))
            t_hf.append(timed(f_hf, sync))
        rows.append((name, statistics.median(t_ours), statistics.median(t_hf)))
    tokens = a.batch * a.new_tokens
    print(f"\n{'':18s} {'ours (s)':>9s} {'HF (s)':>9s} {'ours/HF':>8s} {'HF/ours':>8s}")
    for name, o, h in rows:
        print(f"{name:18s} {o:9.3f} {h:9.3f} {o / h:8.2f} {h / o:8.2f}")
    print(f"sampling: ours {tokens / rows[1][1]:.0f} tokens/s, HF {tokens / rows[1][2]:.0f} tokens/s")


if __name__ == "__main__":
    main()
