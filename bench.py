"""Benchmark model.py against transformers.LlamaForCausalLM on the same weights, side by side.

    python bench.py              # dim 512, 8 layers, 8/4 heads, vocab 32000; float32, 2 threads
    python bench.py --threads 16 --device cuda --dtype bfloat16
    python bench.py --busy_core  # the demo's L3M step, quiet and beside a busy core, per policy

Prints times and ratios for (1) forward+backward of a batch 8 x 256 and (2) sampling 128 new tokens
for a batch of 8 with top-p 0.9 (both sides sample, no early stop: EOS is an id the model never
emits), once per --logit_scales (1: random weights' nearly flat next-token distribution; 10: a
peaked one, as a trained model's), ours eager, ours with torch.compile'd decode step, and HF's. Each
measurement is the median of --repeats runs after one warm-up, all contenders interleaved so that
machine noise hits them alike. Decoding speed, the decode steps alone (each rollout is timed again
for one token, its prefill and first sample, and that time taken off), is also set against the read
bound: every decode step reads the weights (all but the embedding table) and the KV cache once, so
tokens/s ≤ batch × (memory read bandwidth, measured by summing a large tensor) ÷ (those bytes). On
CUDA the compiled decode step asks for CUDA graphs (mode="reduce-overhead"); bench.py counts their
replays per decode step. --decode_only: the rollouts alone, ours alone.
"""
import argparse
import contextlib
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import data
import l3m
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
    p.add_argument("--logit_scales", default="1,10",
                   help="output-layer scales to sample at: 1 gives random weights' nearly flat "
                        "next-token distribution (a huge nucleus); ~10 a peaked one, as a trained "
                        "model's")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile'd decode step")
    p.add_argument("--decode_only", action="store_true",
                   help="only the rollouts, ours alone: no forward+backward, no transformers")
    p.add_argument("--memory", action="store_true",
                   help="instead: peak memory of an L3M constraint step without and with a "
                        "reference model (§5.3)")
    # one of the two, in a child process
    p.add_argument("--memory_case", choices=["l3m", "l3m+reference"], help=argparse.SUPPRESS)
    p.add_argument("--fsdp_rollout", action="store_true",
                   help="instead: rollouts through train.py's FSDP2 model (activation "
                        "checkpointing on) against the bare model that train.py decodes on "
                        "(train.bare), both on the gathered weights")
    p.add_argument("--busy_core", action="store_true",
                   help="instead: the demo's L3M step (train.py from the demo base), quiet and "
                        "beside one busy core, under each thread policy")
    p.add_argument("--steps", type=int, default=40, help="--busy_core: L3M steps per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    if a.memory_case:
        return print(json.dumps(constraint_step_memory(a, a.memory_case == "l3m+reference")))
    if a.memory:
        return memory_table(a)
    if a.fsdp_rollout:
        return fsdp_rollout(a)
    if a.busy_core:
        return busy_core(a)
    transformers = None
    if not a.decode_only:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: ours only (pip install transformers for the HF "
                  "columns)")
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    args = M.ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                       vocab_size=a.vocab_size, max_seq_len=a.seq_len + a.new_tokens + a.prompt_len)
    ours = M.Transformer(args).init_weights(0).to(a.device, dtype)
    hf = None
    if transformers is not None:  # the same weights in HF's layout
        cfg = transformers.LlamaConfig(
            hidden_size=a.dim, intermediate_size=args.hidden_dim, num_hidden_layers=a.n_layers,
            num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
            vocab_size=a.vocab_size, max_position_embeddings=args.max_seq_len, bos_token_id=1,
            eos_token_id=a.vocab_size + 1, pad_token_id=0)
        cfg._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(cfg).to(a.device, dtype)
        hf.load_state_dict(M.meta_to_hf(ours.state_dict(), args), strict=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"config: {args}\n{weight_bytes / 1e6:.0f} MB of weights, {a.device} {a.dtype}, "
          f"{torch.get_num_threads()} threads")
    compiled = None
    if not a.no_compile:
        compiled = M.CompiledDecode("reduce-overhead" if a.device == "cuda" else None)

    w0 = ours.output.weight.detach().clone()
    x = torch.randint(0, a.vocab_size, (a.batch, a.seq_len), device=a.device)
    prompts = torch.randint(3, a.vocab_size, (a.batch, a.prompt_len), device=a.device)

    def train_ours():
        ours(x).float().logsumexp(-1).mean().backward()

    def train_hf():
        hf(x).logits.float().logsumexp(-1).mean().backward()

    def sample_ours(step=M.decode_one_token, n=a.new_tokens):
        g = torch.Generator(a.device).manual_seed(0)
        out, _ = M.generate(ours, prompts.tolist(), n, eos_id=a.vocab_size + 1, top_p=0.9,
                            generator=g, step=step)
        assert all(len(o) == n for o in out)

    def sample_hf(n=a.new_tokens):
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                              top_p=0.9, top_k=None, temperature=1.0, max_new_tokens=n,
                              min_new_tokens=n)
        assert out.shape[1] == a.prompt_len + n

    def measure(contenders: dict) -> dict:
        """Median seconds per contender: one warm-up each (compiles), then --repeats rounds,
        interleaved."""
        for f in contenders.values():
            f()
        times = {k: [] for k in contenders}
        for _ in range(a.repeats):
            for k, f in contenders.items():
                times[k].append(timed(f, sync))
        return {k: statistics.median(v) for k, v in times.items()}

    rows = []
    if not a.decode_only:
        rows.append(("forward+backward", measure({"ours": train_ours,
                                                  **({"HF": train_hf} if hf else {})})))
    decode = []  # (name, seconds of the decode steps alone, per contender)
    for scale in [float(v) for v in a.logit_scales.split(",")]:
        with torch.no_grad():  # both models' output layers: the initial weights times this scale
            for layer in [ours.output] + ([hf.lm_head] if hf else []):
                layer.weight.copy_(w0 * scale)
            probs = torch.softmax(ours(prompts).float(), -1)
        sorted_probs = probs.flatten(0, 1).sort(-1, descending=True)[0]
        nucleus = (M.nucleus(sorted_probs, 0.9) > 0).sum(-1).float().mean().item()
        contenders = {"ours": sample_ours, **({"HF": sample_hf} if hf else {})}
        if compiled is not None:
            contenders["ours, compiled"] = lambda n=a.new_tokens: sample_ours(compiled, n)
        # each again for one token, the prefill and its sample: the rest is the decode steps
        firsts = {k: (lambda f=f: f(n=1)) for k, f in contenders.items()}
        t = measure({**contenders, **{(k, 1): f for k, f in firsts.items()}})
        name = f"sample, logit scale {scale:g} (0.9-nucleus ~{nucleus:.0f} tokens)"
        rows.append((name, {k: t[k] for k in contenders}))
        decode.append((name, {k: t[k] - t[(k, 1)] for k in contenders}))
    bandwidth = read_bandwidth(a.device, sync)

    print(f"\n{'whole rollouts, prefill included':52s} {'ours (s)':>9s} {'HF (s)':>9s} "
          f"{'ours/HF':>8s} {'HF/ours':>8s}")
    for name, t in rows:
        h = t.get("HF", float("nan"))
        print(f"{name:52s} {t['ours']:9.3f} {h:9.3f} {t['ours'] / h:8.2f} {h / t['ours']:8.2f}")
    read = decode_bytes(ours, a.batch, a.prompt_len + a.new_tokens)
    bound = a.batch * bandwidth / read
    print(f"\ndecoding, tokens/s without the prefill (read bandwidth {bandwidth / 1e9:.1f} GB/s; a "
          f"decode step reads {read / 1e6:.0f} MB, the weights but the embedding table and the KV "
          f"cache: the read bound is {bound:.0f})")
    print(f"{'':52s} {'ours':>9s} {'compiled':>9s} {'HF':>9s} {'eager/compiled':>15s} "
          f"{'best/bound':>11s}")
    tokens = a.batch * (a.new_tokens - 1)
    for name, t in decode:
        c = t.get("ours, compiled", float("nan"))
        best = min(t["ours"], c) if c == c else t["ours"]
        hf_speed = tokens / t.get("HF", float("nan"))
        print(f"{name:52s} {tokens / t['ours']:9.0f} {tokens / c:9.0f} {hf_speed:9.0f} "
              f"{t['ours'] / c:15.2f} {tokens / best / bound:11.2f}")
    if compiled is not None and a.device == "cuda":
        # less those of one token, as for the times: the prefill's graph replays too
        with graph_replays() as whole:
            sample_ours(compiled)
        with graph_replays() as first:
            sample_ours(compiled, n=1)
        from torch._dynamo.utils import counters
        per_step = (whole[0] - first[0]) / (a.new_tokens - 1)
        print(f"CUDA graphs: {per_step:.2f} replays per decode step "
              f"(1.00: each step one captured graph), "
              f"{counters['inductor']['cudagraph_skips']} skips (TORCH_LOGS=perf_hints says why)")


@contextlib.contextmanager
def graph_replays():
    """Counts the CUDA graph replays inside the block: Inductor's CUDA graph trees replay
    through torch.cuda.CUDAGraph.replay. Yields a list whose one item is the count."""
    count = [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        count[0] += 1
        return replay(graph)

    torch.cuda.CUDAGraph.replay = counted
    try:
        yield count
    finally:
        torch.cuda.CUDAGraph.replay = replay


def constraint_step_memory(a, reference: bool) -> dict:
    """Peak memory of one L3M constraint step at this config (sample a batch, ℓ̄_θ with its
    gradient, the REINFORCE surrogate, backward, AdamW), after a first step has created AdamW's
    state. With `reference`, a frozen copy of the model also scores the sampled responses, as
    KL-regularised RLHF must and L3M need not (§5.3). CPU: the process's peak resident set
    (ru_maxrss; run each case in a fresh process); CUDA: the allocator's peak."""
    torch.set_num_threads(a.threads)
    # the peak so far; Linux reports KiB
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = 0 if a.device == "cuda" else rss()  # the interpreter and torch, before any tensor
    dtype = getattr(torch, a.dtype)
    args = M.ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                       vocab_size=a.vocab_size, max_seq_len=a.prompt_len + a.new_tokens)
    model = M.Transformer(args).init_weights(0).to(a.device, dtype)
    ref = copy.deepcopy(model).requires_grad_(False) if reference else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompts = torch.randint(3, a.vocab_size, (a.batch, a.prompt_len)).tolist()
    for step in range(2):
        if step == 1 and a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        responses, _ = M.generate(model, prompts, a.new_tokens, eos_id=a.vocab_size + 1,
                                  generator=torch.Generator(a.device).manual_seed(step))
        tokens, mask = (x.to(a.device) for x in data.response_batch(prompts, responses, pad_id=0))
        logp = l3m.logp_norm(model(tokens), tokens, mask)  # (B,)
        c = torch.randn(a.batch, 1, device=a.device)  # the costs' values do not change the memory
        loss = l3m.reinforce_surrogate(logp, c, torch.ones(1, device=a.device))
        if ref is not None:  # + β·KL(π_θ ‖ π_ref) on the samples: ℓ̄_θ − ℓ̄_ref
            with torch.no_grad():
                logp_ref = l3m.logp_norm(ref(tokens), tokens, mask)
            loss = loss + 0.1 * (logp - logp_ref).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if a.device == "cuda" else rss() - base
    return {"peak_bytes": peak, "weight_bytes": sum(p.nbytes for p in model.parameters()),
            "adam_bytes": sum(v.nbytes for s in opt.state.values() for v in s.values()
                              if torch.is_tensor(v))}


def fsdp_rollout(a):
    """Seconds per rollout (batch × new tokens, no early stop) three ways: through the FSDP2 model,
    whose every decode step runs each block's FSDP hooks and checkpoint(); on train.py's path, the
    bare view of the gathered weights (train.gathered, train.bare); and on a standalone Transformer
    holding a copy of the same weights, outside FSDP. Interleaved, median of --repeats after a
    warm-up. A world of one process (gloo on the CPU, NCCL on CUDA)."""
    import train
    torch.set_num_threads(a.threads)
    cfg = train.parse_config([f"--dim={a.dim}", f"--n_layers={a.n_layers}",
                              f"--n_heads={a.n_heads}",
                              f"--n_kv_heads={a.n_kv_heads}", f"--max_len={a.prompt_len}",
                              f"--max_new_tokens={a.new_tokens}",
                              "--activation_checkpointing=True"])
    _, _, device = train.setup_distributed(a.device)
    # sharded as on two or more ranks (one rank trains a plain model)
    model, args = train.build_model(cfg, device, "scratch", a.vocab_size, shard=True)
    prompts = torch.randint(3, a.vocab_size, (a.batch, a.prompt_len)).tolist()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = ["through FSDP2 (hooks, checkpoint)", "train.py's rollout (bare view)",
             "standalone model"]
    times = {name: [] for name in names}
    with train.gathered(model) as (plain,):
        alone = copy.deepcopy(plain)  # its own tensors, no FSDP anywhere
        for i in range(a.repeats + 1):
            for name, m in zip(names, (model, plain, alone)):
                g = torch.Generator().manual_seed(0)
                sample = lambda: M.generate(m, prompts, a.new_tokens, a.vocab_size + 1, generator=g)
                times[name].append(timed(sample, sync))
    print(f"rollouts of {a.batch} × {a.new_tokens} tokens, {a.n_layers} layers, dim {a.dim}, "
          f"{device.type}, {torch.get_num_threads()} threads (median of {a.repeats} after a "
          "warm-up)")
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:36s} {m:8.3f} s")
    print(f"{'FSDP2 / standalone':36s} {medians[names[0]] / medians[names[2]]:8.2f}")
    print(f"{'train.py / standalone':36s} {medians[names[1]] / medians[names[2]]:8.2f}")


# Thread policies of --busy_core: the environment each train.py run starts with. "train.py's
# default" sets nothing, so that train.py chooses (train.CoreShare); the others pin what libgomp
# (torch's OpenMP on Linux) reads at start, and OMP_NUM_THREADS turns CoreShare off.
CORES = str(torch.get_num_threads())
POLICIES = {
    f"{CORES} threads, spinning (libgomp's default)": {"OMP_NUM_THREADS": CORES},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    f"{CORES} threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": CORES,
                                                  "OMP_WAIT_POLICY": "PASSIVE"},
    "train.py's default (CoreShare)": {},
}


def busy_core(a):
    """The demo's L3M step (median of t_sample + t_train over --steps steps from the demo base, the
    first two left out), quiet and beside one busy core (a process spinning in a loop), under each
    of POLICIES. Quiet runs go twice, to show their run-to-run spread. Every run is a fresh
    `python train.py` process: OpenMP reads its settings once, when torch starts."""
    import os
    import tempfile

    drop = [k for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    if drop:
        raise SystemExit(f"bench.py --busy_core: unset {', '.join(drop)} first; each run sets "
                         "its own")
    subprocess.run([sys.executable, "train.py", "--steps=1", "--val=8", "--test=8",
                    "--eval_before=False", "--out_dir=out/bench_busy/warmup", "--overwrite=True"],
                   check=True, capture_output=True)

    def step_time(policy: dict) -> tuple:
        """(median step time, the thread count most steps ran on)."""
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "train.py", f"--steps={a.steps}", "--val=8", "--test=8",
                   "--show=0", "--eval_before=False", "--ckpt_every=0", f"--out_dir={out}"]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **policy})
            rows = [json.loads(line) for line in open(f"{out}/ledger.jsonl")][2:]
        threads = statistics.mode(r["threads"] for r in rows)
        return statistics.median(r["t_train"] + r.get("t_sample", 0.0) for r in rows), threads

    quiet = {name: [step_time(policy) for _ in range(2)] for name, policy in POLICIES.items()}
    busy = {}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for name, policy in POLICIES.items():
            busy[name] = step_time(policy)
    finally:
        spinner.kill()
    print(f"the demo's L3M step, median of {a.steps - 2} steps, seconds, on {cpu_name()}; "
          "threads: what most steps ran on, quiet / beside the busy core")
    spin = statistics.mean(t for t, _ in quiet[next(iter(POLICIES))])
    one = busy["1 thread"][0]
    print(f"{'':40s} {'quiet (twice)':>15s} {'quiet / spin':>13s} {'busy core':>10s} "
          f"{'busy / 1 thread':>16s} {'threads':>8s}")
    for name in POLICIES:
        q = " / ".join(f"{t:.3f}" for t, _ in quiet[name])
        ratio = statistics.mean(t for t, _ in quiet[name]) / spin
        threads = f"{quiet[name][0][1]} / {busy[name][1]}"
        print(f"{name:40s} {q:>15s} {ratio:13.2f} {busy[name][0]:10.3f} "
              f"{busy[name][0] / one:16.2f} {threads:>8s}")


def cpu_name() -> str:
    """The CPU's model name and core count (Linux's /proc/cpuinfo; else the core count alone)."""
    import os
    cores = f"{os.cpu_count()} cores"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return cores
    return f"{names[0]}, {cores}" if names else cores


def memory_table(a):
    """Both cases of constraint_step_memory, each in a fresh process, as a table."""
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "batch", "new_tokens",
             "prompt_len", "threads", "device", "dtype")
    flags = [f"--{k}={v}" for k, v in vars(a).items() if k in shape]
    cases = {}
    for case in ("l3m", "l3m+reference"):
        child = subprocess.run([sys.executable, __file__, f"--memory_case={case}", *flags],
                               capture_output=True, text=True, check=True)
        cases[case] = json.loads(child.stdout)
    mb = 2 ** 20
    kind = "peak allocated (torch.cuda)" if a.device == "cuda" else \
        "peak resident set (ru_maxrss) above the process's after importing torch"
    print(f"one constraint step, batch {a.batch} × {a.new_tokens} new tokens, {a.device} "
          f"{a.dtype}; {kind}, MiB")
    l3m_case = cases["l3m"]
    print(f"weights {l3m_case['weight_bytes'] / mb:.0f}, AdamW state "
          f"{l3m_case['adam_bytes'] / mb:.0f}")
    for case, m in cases.items():
        print(f"{case:16s} {m['peak_bytes'] / mb:8.0f}")
    extra = cases["l3m+reference"]["peak_bytes"] - cases["l3m"]["peak_bytes"]
    print(f"the reference costs {extra / mb:.0f} MiB: {extra / l3m_case['peak_bytes']:.0%} more "
          "than L3M's step")


def read_bandwidth(device, sync) -> float:
    """Bytes per second read by summing a float32 tensor too large for any cache, best of 5.
    CUDA: 2 GiB, timed by CUDA events (a host clock adds its launch and sync latency to a sum that
    takes well under a millisecond); CPU: 256 MiB on the host clock."""
    nbytes = 2 * 2 ** 30 if device == "cuda" else 256 * 2 ** 20
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    if device != "cuda":
        return nbytes / min(timed(x.sum, sync) for _ in range(5))
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / min(times)


def decode_bytes(model: M.Transformer, batch: int, max_len: int) -> int:
    """Bytes one decode step reads at least: every weight but the embedding table (a step reads
    `batch` of its rows), and the whole KV cache (KVCache: a step attends over all max_len slots,
    masked)."""
    args, size = model.args, model.output.weight.element_size()
    weights = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    weights += batch * args.dim  # the embedding rows a step reads
    cache = 2 * args.n_layers * batch * args.n_kv_heads * max_len * args.head_dim
    return (weights + cache) * size


if __name__ == "__main__":
    main()
