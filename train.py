"""Fine-tune a LLaMA with L3M (or SFT, the minimax-Lagrangian baseline, or a reward model). One file.

    python train.py                                            # one CPU process: the demo (L3M, length band)
    torchrun --standalone --nproc_per_node=2 train.py          # two CPU processes (gloo), same result
    torchrun --standalone --nproc_per_node=8 train.py --init=ckpt/llama-7b --data=ultrachat.jsonl \\
        --batch_size=64 --micro_batch=8 --lr=1e-6 --max_len=512 --max_new_tokens=512 \\
        --constraint="length>=50" --constraint="length<=100" --activation_checkpointing=True
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
    python train.py --method=reward --init=ckpt/llama-7b --data=hh/helpful-base/train.jsonl.gz \\
        --data_test=hh/helpful-base/test.jsonl.gz --epochs=2 --warmup=0.1 --out_dir=out/rm_helpful

--method: sft (task steps only), l3m (the paper), mm (learned multipliers), reward (Bradley–Terry).
Flags are the fields of Config below, as --key=value; `python train.py --help` lists them.

Where this departs from, or pins down, the paper:
- "One epoch": the coin makes half the steps task steps, so a constrained run takes 2 × (task batches
  per epoch) steps; task and prompt batches are drawn from the training split by two independent
  streams, each continuing into its next epoch when it runs out.
- The coin and the sampling noise are functions of (seed, step) and of (seed, step, global row), not
  stateful generators: every rank flips the same coin, a row's response does not depend on how rows
  are split over ranks, and a resumed run needs no RNG state to continue exactly.
- Rollouts, evaluation and reward scoring run on gathered (unsharded) weights: no collective inside
  the decode loop, so a rank whose rows all stopped early simply waits at the next all-reduce. The
  alternative, lock-step sharded decoding, all-gathers every block's weights at every token; gathering
  once costs one copy of the weights per rank for the length of the rollout (14 GB in bf16 at 7B).
- The learning-rate schedule is a pure function of the step (linear warm-up, cosine to 0), shared by
  both kinds of step, as is the AdamW state.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
import l3m
import model as M
import rewards


@dataclass
class Config:
    method: str = "l3m"  # sft | l3m | mm | reward
    out_dir: str = "out/l3m"  # checkpoints, ledger.jsonl, report.json
    init: str = "demo"  # our checkpoint folder (python model.py convert ...); 'scratch': random init;
    # 'demo': the demo's base model, pretrained from scratch on the demo data once and cached in data_dir
    data_dir: str = "out"  # where the demo data, its tokenizer and the demo base model are cached
    data: str = "demo"  # 'demo', or UltraChat JSONL(.gz) paths (HH-RLHF for --method=reward), comma-separated
    data_test: str = ""  # HH-RLHF test file(s) for --method=reward ('' with demo data: the demo's)
    demo_reward: str = "informative"  # which demo preference set --method=reward learns (informative | cautious)
    constraint: list = field(default_factory=lambda: ["length>=20", "length<=35"])  # repeat the flag; see rewards.py
    reward_model: list = field(default_factory=list)  # NAME=FOLDER, repeat the flag: learned rewards for constraints
    val: float = 200  # validation examples (a number, or a fraction if < 1)
    test: float = 200  # test examples
    max_len: int = 512  # drop (prompt, response) pairs longer than this (tokens)
    # model shape and schedule for --init=scratch (the demo's pretraining)
    base_epochs: float = 3.0
    base_lr: float = 3e-3
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    # optimisation (App. A); the demo's defaults are sized for a CPU
    epochs: float = 1.0
    steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16  # global mini-batch (64 in the paper), reached by accumulation over micro-batches
    micro_batch: int = 16  # per rank and forward
    lr: float = 2e-4  # 1e-6 at 7B
    weight_decay: float = 0.1
    warmup: float = 0.05  # share of the steps
    grad_clip: float = 1.0  # per kind of step (§5.4)
    # L3M (§5)
    mu_0: float = 1.0
    mu_T: float = 1e-6
    ema_alpha: float = 0.1
    eta_lam: float = 0.1  # --method=mm only
    top_p: float = 0.9
    temperature: float = 1.0  # 0: greedy rollouts (log-probs then taken at temperature 1)
    max_new_tokens: int = 128
    show: int = 3  # sampled test responses printed before/after
    # run
    eval_every: int = 100  # steps; 0: only at the start and the end
    ckpt_every: int = 100  # steps; 0: only the final model
    resume: bool = False  # continue from out_dir/ckpt
    stop_after: int = 0  # > 0: save a checkpoint and stop after this step (a time slice; continue with --resume)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpointing: bool = False
    debug_nan_step: int = -1  # inject a non-finite loss on rank 0 at this step (tests the skip)


def parse_config(argv) -> Config:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, list):
            p.add_argument(f"--{f.name}", action="append", help=f"repeat; default {default}")
        elif isinstance(default, bool):
            p.add_argument(f"--{f.name}", type=lambda s: {"true": True, "false": False}[s.lower()], default=default,
                           help=f"True/False; default {default}")
        else:
            p.add_argument(f"--{f.name}", type=type(default), default=default, help=f"default {default}")
    a = vars(p.parse_args(argv))
    cfg = Config(**{k: v for k, v in a.items() if v is not None})
    if cfg.method not in ("sft", "l3m", "mm", "reward"):
        p.error(f"--method must be sft, l3m, mm or reward, not {cfg.method!r}")
    if cfg.batch_size % cfg.micro_batch:
        p.error(f"--batch_size={cfg.batch_size} is not a multiple of --micro_batch={cfg.micro_batch}")
    return cfg


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE; a plain process is a world of one


def setup_distributed(device: str):
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    global _COMM_DEVICE
    _COMM_DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), _COMM_DEVICE


def print0(*a, **k):
    if dist.get_rank() == 0:
        print(*a, **k, flush=True)


_COMM_DEVICE = torch.device("cpu")  # NCCL reduces CUDA tensors only, gloo CPU ones


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over ranks, in place (also the all-reduce hook of l3m.ConstraintEMA); returns t."""
    x = t.to(_COMM_DEVICE)
    dist.all_reduce(x)
    if x is not t:
        t.copy_(x)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank, in rank order; on the CPU."""
    x = t.to(_COMM_DEVICE).contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out).cpu()


# -----------------------------------------------------------------------------
# Model: meta-device init, activation checkpointing, FSDP2, strict load


def apply_ac(model: M.Transformer):
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint
    for block in model.layers:
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)
    print0(f"activation checkpointing on {len(model.layers)} blocks")


def apply_fsdp(model: M.Transformer, param_dtype, reduce_dtype):
    """Shard each block, then the root (embedding, final norm, output), over all ranks (FSDP2)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    print0(f"FSDP2 over {dist.get_world_size()} rank(s): {len(model.layers)} blocks + root, "
           f"params {param_dtype}, reductions {reduce_dtype}")


def build_model(cfg: Config, device, init: str, tokenizer_vocab: int, train: bool = True):
    """Our checkpoint folder (or 'scratch') -> a sharded model on device, weights loaded strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if init == "scratch":
        args = M.ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                           vocab_size=tokenizer_vocab, multiple_of=32, max_seq_len=cfg.max_len + cfg.max_new_tokens)
        sd = M.Transformer(args).init_weights(cfg.seed).state_dict()
    else:
        with open(os.path.join(init, "args.json")) as f:
            args = M.ModelArgs(**json.load(f))
        sd = torch.load(os.path.join(init, "model.pth"), map_location="cpu", mmap=True, weights_only=True)
        if args.vocab_size != tokenizer_vocab:
            raise M.CheckpointError(f"{init}: vocab_size={args.vocab_size} but the tokenizer has {tokenizer_vocab}")
    with torch.device("meta"):
        model = M.Transformer(args)
    M.check_state_dict(sd, model, init)
    if train and cfg.activation_checkpointing:
        apply_ac(model)
    cuda = device.type == "cuda"
    apply_fsdp(model, torch.bfloat16 if cuda else torch.float32, torch.float32)
    model.to_empty(device=device)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
    return model.train(train), args


@contextlib.contextmanager
def gathered(model):
    """All-gather every shard once and keep the full weights for a stretch of no-grad forwards.

    Inside, forwards run no collective, so ranks may run different numbers of them (rollouts that stop
    at different steps). On exit the weights are sharded again.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield
    finally:
        for m in units:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def full_state_dict(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -----------------------------------------------------------------------------
# Data


class Stream:
    """Global batches of one split, epoch after epoch; `position` (batches taken) is all a resume needs."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = data.num_batches(n, batch_size, world)
        self.position = 0

    def next(self) -> np.ndarray:
        epoch, b = divmod(self.position, self.per_epoch)
        self.position += 1
        return next(data.epoch_batches(self.n, self.bs, seed=self.seed, epoch=epoch, rank=self.rank,
                                       world_size=self.world, start_batch=b))


def load_task_data(cfg: Config, tok):
    paths = [data.prepare_demo(cfg.data_dir, cfg.seed).task] if cfg.data == "demo" \
        else cfg.data.split(",")
    read = data.read_ultrachat(paths, tok, max_tokens=cfg.max_len, seed=cfg.seed)
    print0(read)
    return data.split_dataset(read.examples, val=cfg.val, test=cfg.test, seed=cfg.seed)


def load_preference_data(cfg: Config, tok):
    if cfg.data == "demo":
        demo = data.prepare_demo(cfg.data_dir, cfg.seed)
        train_paths = [getattr(demo, f"{cfg.demo_reward}_train")]
        test_paths = [getattr(demo, f"{cfg.demo_reward}_test")]
    else:
        train_paths, test_paths = cfg.data.split(","), cfg.data_test.split(",")
    read = data.read_hh(train_paths, tok, max_tokens=cfg.max_len)
    print0(read)
    train, val, _ = data.split_dataset(read.examples, val=0.05, test=0, seed=cfg.seed)
    test = data.read_hh(test_paths, tok, max_tokens=cfg.max_len).examples if test_paths[0] else []
    return train, val, test


def demo_tokenizer_path(cfg: Config) -> str:
    return str(data.prepare_demo(cfg.data_dir, cfg.seed).tokenizer)


# -----------------------------------------------------------------------------
# Rollouts, rewards, evaluation


def row_generators(seed: int, step: int, rows, evaluation: bool = False):
    """One generator per row, keyed by (seed, step, the row's global index): ranks sample independently.

    Evaluations reuse the same keys every time, so before/after comparisons share their sampling noise.
    """
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(evaluation), step, int(r)])
                                              .generate_state(1)[0])) for r in rows]


def rollout(model, tok, prompts, cfg: Config, generators):
    """Sample responses with top-p 0.9 (App. A); call inside `gathered(model)`."""
    responses, ended = M.generate(model, prompts, cfg.max_new_tokens, tok.eos_id, cfg.temperature, cfg.top_p,
                                  generators)
    return rewards.Samples.from_generate(prompts, responses, ended, tok)


def costs(constraints, reward_models, samples) -> torch.Tensor:
    """c_i = b_i − r_i(y|x) for every constraint, (B, k); learned rewards score on gathered weights."""
    with contextlib.ExitStack() as stack:
        for rm in reward_models:
            stack.enter_context(gathered(rm.model))
        return torch.stack([con.cost(samples) for con in constraints], 1)  # (B, k)


def sequence_nll(model, tokens, mask, cfg: Config, device) -> torch.Tensor:
    """Per-sequence −ℓ̄_θ(y|x), (B,), in micro-batches, no grad (inside `gathered`)."""
    out = []
    for i in range(0, len(tokens), cfg.micro_batch):
        t, m = tokens[i:i + cfg.micro_batch].to(device), mask[i:i + cfg.micro_batch].to(device)
        out.append(-l3m.logp_norm(model(t), t, m).float().cpu())
    return torch.cat(out)


def evaluate(model, tok, examples, cfg: Config, constraints, reward_models, device, split: str) -> dict:
    """Task perplexity (−ℓ̄ per sequence), rollout lengths and each constraint's mean reward, on a split.

    Examples are dealt round-robin to the ranks and padded to equal counts (the pads are dropped from
    the statistics), then gathered, so the numbers are exact and the same on every rank.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(len(examples) / world)
    idx = [min(rank + world * j, len(examples) - 1) for j in range(per_rank)]
    real = torch.tensor([rank + world * j < len(examples) for j in range(per_rank)])
    was_training = model.training
    model.eval()
    nll, lengths, ended, rs, shown = [], [], [], [], []
    with gathered(model):
        for i in range(0, per_rank, cfg.micro_batch):
            batch = [examples[j] for j in idx[i:i + cfg.micro_batch]]
            tokens, mask = data.task_batch(batch, pad_id=tok.eos_id)
            nll.append(sequence_nll(model, tokens, mask, cfg, device))
            samples = rollout(model, tok, data.prompt_batch(batch), cfg,
                              row_generators(cfg.seed, 0, idx[i:i + cfg.micro_batch], evaluation=True))
            lengths.append(rewards.length_reward(samples))
            ended.append(torch.tensor(samples.ended, dtype=torch.float32))
            if i == 0:  # a few of rank 0's responses, the same prompts and sampling noise at every evaluation
                shown = [{"prompt": p, "response": r, "length": int(n)} for p, r, n in
                         zip(samples.prompt_texts[:cfg.show], samples.response_texts[:cfg.show], lengths[0])]
            if constraints:
                rs.append(costs(constraints, reward_models, samples))
    model.train(was_training)
    keep = all_gather_cat(real)
    nll, lengths, ended = (all_gather_cat(torch.cat(x))[keep] for x in (nll, lengths, ended))
    c = all_gather_cat(torch.cat(rs))[keep] if constraints else None  # (N, k)
    q = torch.quantile(lengths, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    report = {"split": split, "n": int(keep.sum()), "perplexity_mean": nll.mean().item(),
              "perplexity_std": nll.std().item(), "length_mean": lengths.mean().item(),
              "length_p10": q[0], "length_q1": q[1], "length_median": q[2], "length_q3": q[3], "length_p90": q[4],
              "ended_share": ended.mean().item(),
              "constraints": {}, "samples": shown}
    for i, con in enumerate(constraints):
        C = c[:, i].mean().item()  # C_i = E[b_i − r_i]
        report["constraints"][con.name] = {"b": con.b, "reward_mean": con.b - C, "C": C, "satisfied": C <= 0}
    return report


def format_comparison(before: dict, after: dict, method: str, lam_hat=None) -> str:
    """The test split before and after fine-tuning, side by side (the paper's Fig. 2 columns), then samples."""
    def col(r):
        rows = [f"{r['length_mean']:.1f}", f"{r['length_q1']:.0f} / {r['length_median']:.0f} / {r['length_q3']:.0f}",
                f"{r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f}", f"{100 * r['ended_share']:.0f}%"]
        return rows + [f"{c['C']:+.2f} {'✓' if c['satisfied'] else '✗'}" for c in r["constraints"].values()]
    names = ["mean length (tokens)", "length quartiles", "task perplexity (−ℓ̄)", "ended with EOS"]
    names += [f"C = E[b − r]  {n}" for n in before["constraints"]]
    lines = [f"{'test split (' + str(before['n']) + ' prompts)':32s} {'before':>18s} {'after (' + method + ')':>18s}"]
    lines += [f"{n:32s} {b:>18s} {a:>18s}" for n, b, a in zip(names, col(before), col(after))]
    if lam_hat is not None:
        lines.append(f"{'final λ̂ (µ = µ_T)':32s} {'':>18s} {', '.join(f'{x:.2g}' for x in lam_hat):>18s}")
    for b, a in zip(before["samples"], after["samples"]):
        prompt = b["prompt"].rsplit("Human:", 1)[-1].replace("Assistant:", "").strip()
        lines += ["", f"prompt: {prompt}", f"  before ({b['length']:3d} tokens): {b['response']}",
                  f"  after  ({a['length']:3d} tokens): {a['response']}"]
    return "\n".join(lines)


def format_report(r: dict) -> str:
    lines = [f"{r['split']} ({r['n']} examples): perplexity {r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f}, "
             f"length mean {r['length_mean']:.1f} (quartiles {r['length_q1']:.0f} / {r['length_median']:.0f} / "
             f"{r['length_q3']:.0f}), ended with EOS {100 * r['ended_share']:.0f}%"]
    for name, c in r["constraints"].items():
        lines.append(f"  {name:24s} mean reward {c['reward_mean']:9.3f}  b = {c['b']:9.3f}  "
                     f"{'✓' if c['satisfied'] else '✗'}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Checkpoints: sharded model + optimiser (torch.distributed.checkpoint) and a small state file


def save_train_state(folder: str, model, optimizer, state: dict):
    """Write folder atomically: every rank writes its shards into folder.tmp, then rank 0 renames."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = folder + ".tmp"
    if dist.get_rank() == 0 and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    dist.barrier()


def load_train_state(folder: str, model, optimizer) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.isfile(os.path.join(folder, "state.pt")):
        raise ConfigError(f"--resume: no checkpoint at {folder}; run without --resume=True first")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return torch.load(os.path.join(folder, "state.pt"), weights_only=False)


# -----------------------------------------------------------------------------
# The loop


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up over cfg.warmup of the steps, then cosine decay to 0 (App. A)."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def coin_at(seed: int, step: int) -> bool:
    """The shared fair coin of step `step` (§5.4): heads (True) a task step, tails a constraint step."""
    return l3m.Multipliers.coin(torch.Generator().manual_seed(seed * 1_000_003 + step))


def backward_micro(model, loss_fn, n_rows: int, micro: int, step: int, cfg: Config) -> tuple:
    """Accumulate the gradient of a batch mean over micro-batches; skip together if any rank sees inf/NaN.

    loss_fn(slice) returns the mean loss of that slice of the local batch. Returns (loss, finite).
    """
    total = 0.0
    for i in range(0, n_rows, micro):
        j = slice(i, min(i + micro, n_rows))
        loss = loss_fn(j) * ((j.stop - j.start) / n_rows)
        if step == cfg.debug_nan_step and dist.get_rank() == 0:
            loss = loss * float("nan")
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0]))
        if bad.item() > 0:  # every rank sees the same flag, so every rank stops before the backward
            return float("nan"), False
        loss.backward()
        total += loss.item()
    loss_sum = all_reduce_sum(torch.tensor([total], dtype=torch.float64))
    return loss_sum.item() / dist.get_world_size(), True


def clip_and_step(model, optimizer, cfg: Config, finite: bool) -> float:
    """Clip this kind of step's gradient at cfg.grad_clip (§5.4) and step; returns the norm before clipping."""
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def run(cfg: Config, device) -> dict:
    """One training run as configured. Returns the final report (the same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"--batch_size={cfg.batch_size} does not split over {world} ranks")
    local_bs = cfg.batch_size // world
    torch.manual_seed(cfg.seed)
    tok_path = os.path.join(cfg.init, "tokenizer.model") if cfg.init != "scratch" else demo_tokenizer_path(cfg)
    tok = M.Tokenizer(tok_path)
    model, args = build_model(cfg, device, cfg.init, tok.vocab_size)
    constrained = cfg.method in ("l3m", "mm")
    reward_models, constraints = [], []
    if cfg.method != "reward":
        learned = {}
        for spec in cfg.reward_model:
            name, _, folder = spec.partition("=")
            rm, _ = build_model(cfg, device, folder, tok.vocab_size, train=False)
            rm.requires_grad_(False)
            learned[name] = rewards.LearnedReward(rm, pad_id=tok.eos_id, micro_batch=cfg.micro_batch)
        reward_models = list(learned.values())
        if constrained or cfg.constraint:
            constraints = rewards.parse_constraints(cfg.constraint, {"length": rewards.length_reward, **learned})
    if cfg.method == "reward":
        train, val, test = load_preference_data(cfg, tok)
    else:
        train, val, test = load_task_data(cfg, tok)
    task_stream = Stream(len(train), local_bs, cfg.seed, rank, world)
    prompt_stream = Stream(len(train), local_bs, cfg.seed + 1, rank, world)
    total = cfg.steps or max(1, round(cfg.epochs * task_stream.per_epoch * (2 if constrained else 1)))
    mult = l3m.Multipliers(len(constraints), cfg.method, cfg.eta_lam if cfg.method == "mm" else None,
                           cfg.ema_alpha) if constrained else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt, ledger_path = os.path.join(cfg.out_dir, "ckpt"), os.path.join(cfg.out_dir, "ledger.jsonl")
    start, best, reports = 0, None, {}
    if cfg.resume:
        state = load_train_state(ckpt, model, optimizer)
        start, task_stream.position, prompt_stream.position = state["step"], state["task_pos"], state["prompt_pos"]
        best, reports = state["best"], state["reports"]
        if mult is not None:
            mult.load_state_dict(state["multipliers"])
        print0(f"resumed from {ckpt} at step {start}")
    if rank == 0:  # the ledger keeps exactly the steps before `start`
        lines = []
        if cfg.resume and os.path.isfile(ledger_path):
            with open(ledger_path) as f:
                lines = f.readlines()[:start]
        with open(ledger_path, "w") as f:
            f.writelines(lines)
    print0(f"config: {json.dumps(dataclasses.asdict(cfg))}\nmodel: {args}\n{total} steps, "
           f"{len(train)} train / {len(val)} val / {len(test)} test, global batch {cfg.batch_size} = "
           f"{world} rank(s) × {local_bs}")

    def do_eval(examples, split):
        if cfg.method == "reward":
            acc = reward_accuracy(model, examples, tok, cfg)
            return {"split": split, "n": len(examples), "accuracy": acc}
        return evaluate(model, tok, examples, cfg, constraints, reward_models, device, split)

    if start == 0 and cfg.method == "reward":
        reports["val_accuracy_before"] = do_eval(val, "val (before)")["accuracy"]
        print0(f"val accuracy before training: {reports['val_accuracy_before']:.3f}")
    elif start == 0 and cfg.init != "scratch":  # a random model's report would say nothing
        reports["before"] = do_eval(test, "test (before)")
        print0(format_report(reports["before"]))
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        mu = l3m.mu_at(step, max(1, total - 1), cfg.mu_0, cfg.mu_T)  # µ_0 on the first step, µ_T on the last
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        heads = coin_at(cfg.seed, step) if constrained else True
        rec = {"step": step, "kind": "task" if heads else "constraint", "mu": mu, "lr": lr_at(step, total, cfg)}
        t0 = time.perf_counter()
        if cfg.method == "reward":
            rec["kind"] = "reward"
            batch = [train[i] for i in task_stream.next()]

            def loss_fn(j):
                r_plus, r_minus = rewards.preference_rewards(model, batch[j], pad_id=tok.eos_id)
                return rewards.bradley_terry_loss(r_plus, r_minus)
            rec["loss"], finite = backward_micro(model, loss_fn, len(batch), cfg.micro_batch, step, cfg)
        elif heads:
            tokens, mask = data.task_batch([train[i] for i in task_stream.next()], pad_id=tok.eos_id)
            tokens, mask = tokens.to(device), mask.to(device)
            rec["loss"], finite = backward_micro(
                model, lambda j: l3m.task_loss(l3m.logp_norm(model(tokens[j]), tokens[j], mask[j])),
                len(tokens), cfg.micro_batch, step, cfg)
        else:
            rows = prompt_stream.next()
            prompts = [train[i].prompt.tolist() for i in rows]
            with gathered(model):
                samples = rollout(model, tok, prompts, cfg, row_generators(cfg.seed, step, rows))
            c = costs(constraints, reward_models, samples).to(device)  # (B, k), c_i = b_i − r_i
            rec["t_sample"] = time.perf_counter() - t0
            rec["C"] = (all_reduce_sum(c.sum(0).double()) / cfg.batch_size).tolist()
            rec["C_hat"] = mult.observe(c, all_reduce_sum).tolist()
            lam = mult.lam(mu).to(device)  # (k,), detached float32
            rec["lam"] = lam.tolist()
            rec["branch"] = ["log" if C <= -mu ** 2 else "linear" for C in rec["C_hat"]]  # of B_{µ,µ²}(Ĉ_i), Eq. 9
            tokens, mask = data.response_batch(prompts, samples.responses, pad_id=tok.eos_id)
            tokens, mask = tokens.to(device), mask.to(device)
            temp = cfg.temperature or 1.0
            rec["loss"], finite = backward_micro(
                model, lambda j: l3m.reinforce_surrogate(l3m.logp_norm(model(tokens[j]), tokens[j], mask[j], temp),
                                                         c[j], lam),
                len(tokens), cfg.micro_batch, step, cfg)
            lengths = all_gather_cat(rewards.length_reward(samples))
            truncated = all_gather_cat(torch.tensor([not e for e in samples.ended], dtype=torch.float32))
            p10, p90 = torch.quantile(lengths, torch.tensor([0.1, 0.9])).tolist()
            rec.update(len_mean=lengths.mean().item(), len_p10=p10, len_p90=p90, truncated=truncated.mean().item())
        rec["grad_norm"] = clip_and_step(model, optimizer, cfg, finite)
        rec["skipped"] = not finite
        rec["t_train"] = time.perf_counter() - t0 - rec.get("t_sample", 0.0)
        if device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if rank == 0:
            with open(ledger_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            show = {"loss": f"{rec['loss']:.3f}"}
            if mult is not None and mult.ema.value is not None:
                show.update({"µ": f"{mu:.1e}", "C": [round(x, 2) for x in mult.ema.value.tolist()],
                             "λ": [f"{x:.1e}" for x in mult.lam(mu).tolist()]})
            if "len_mean" in rec:
                show["len"] = f"{rec['len_mean']:.1f}"
            bar.set_postfix(show, refresh=False)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            r = do_eval(val, f"val @ {done}")
            print0(format_report(r) if "accuracy" not in r else f"val @ {done}: accuracy {r['accuracy']:.3f}")
            if cfg.method == "reward" and (best is None or r["accuracy"] > best):
                best = r["accuracy"]
                save_final(model, cfg, args, tok_path, "best")
        stop = done == cfg.stop_after
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0 or stop) and done < total:
            save_train_state(ckpt, model, optimizer, {
                "step": done, "task_pos": task_stream.position, "prompt_pos": prompt_stream.position,
                "best": best, "reports": reports, "config": dataclasses.asdict(cfg),
                "multipliers": mult.state_dict() if mult is not None else None})
        if stop:
            print0(f"stopped after step {done}; continue with --resume=True")
            return reports
    bar.close()
    if cfg.method == "reward":
        r = do_eval(val, "val (final)")
        if best is None or r["accuracy"] > best:
            best = r["accuracy"]
            save_final(model, cfg, args, tok_path, "best")
        reports["val_best_accuracy"] = best
        if test:
            best_model, _ = build_model(cfg, device, os.path.join(cfg.out_dir, "best"), tok.vocab_size, train=False)
            reports["test_accuracy"] = reward_accuracy(best_model, test, tok, cfg)
        print0(f"reward model: best val accuracy {best:.3f}, test accuracy {reports.get('test_accuracy', float('nan')):.3f}")
    else:
        reports["after"] = do_eval(test, "test (after)")
        if mult is not None and mult.ema.value is not None:
            reports["lam_hat"] = mult.lam(cfg.mu_T).tolist()
        if "before" in reports:
            print0(format_comparison(reports["before"], reports["after"], cfg.method, reports.get("lam_hat")))
        else:
            print0(format_report(reports["after"]))
    save_final(model, cfg, args, tok_path, "final")
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), **reports}, f, indent=2)
    return reports


def reward_accuracy(model, examples, tok, cfg: Config) -> float:
    """Held-out pairwise accuracy, examples dealt to the ranks and the counts all-reduced."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = examples[rank::world]
    with gathered(model):
        acc = rewards.evaluate_pairwise_accuracy(model, mine, cfg.micro_batch, pad_id=tok.eos_id) if mine else 0.0
    right = all_reduce_sum(torch.tensor([acc * len(mine), len(mine)], dtype=torch.float64))
    return (right[0] / right[1]).item()


def save_final(model, cfg: Config, args, tok_path: str, name: str):
    """The model in model.py's checkpoint format (loadable by model.load_model and `python model.py sample`)."""
    sd = full_state_dict(model)
    if dist.get_rank() == 0:
        M.save_checkpoint(None, os.path.join(cfg.out_dir, name), args, tok_path, state_dict=sd)
    dist.barrier()


def demo_base(cfg: Config, device) -> str:
    """The demo's 'pretrained LLaMA': SFT from random weights on the demo data, run once and cached."""
    folder = os.path.join(cfg.data_dir, "demo_base")
    if not os.path.isfile(os.path.join(folder, "args.json")):
        print0(f"pretraining the demo base model once, cached in {folder}")
        base = dataclasses.replace(cfg, method="sft", init="scratch", out_dir=folder + "_run", epochs=cfg.base_epochs,
                                   steps=0, lr=cfg.base_lr, constraint=[], reward_model=[], resume=False,
                                   eval_every=0, ckpt_every=0)
        run(base, device)
        if dist.get_rank() == 0:
            os.rename(os.path.join(base.out_dir, "final"), folder)
        dist.barrier()
    return folder


class ConfigError(ValueError):
    """A flag that cannot work."""


def check_config(cfg: Config):
    """Refuse a config before any work, with one message. Every rank runs the same checks on the same
    flags and files, so every rank stops together and none waits at a collective for the others."""
    def need(path, what):
        if not os.path.exists(path):
            raise ConfigError(f"{what} {path!r} does not exist")
    if cfg.init not in ("demo", "scratch"):
        need(os.path.join(cfg.init, "args.json"), "--init checkpoint (convert it with `python model.py convert`):")
    if cfg.data != "demo":
        for path in cfg.data.split(",") + ([p for p in cfg.data_test.split(",") if p] if cfg.method == "reward" else []):
            need(path, "data file")
    for spec in cfg.reward_model:
        name, eq, folder = spec.partition("=")
        if not eq or not name:
            raise ConfigError(f"--reward_model={spec!r}: expected NAME=FOLDER")
        need(os.path.join(folder, "args.json"), f"--reward_model {name}:")
    known = {"length": rewards.length_reward, **{s.partition("=")[0]: rewards.length_reward for s in cfg.reward_model}}
    rewards.parse_constraints(cfg.constraint, known)


def main(argv):
    cfg = parse_config(argv)
    rank, world, device = setup_distributed(cfg.device)
    try:
        check_config(cfg)
        if cfg.init == "demo":
            cfg = dataclasses.replace(cfg, init=demo_base(cfg, device))
        run(cfg, device)
    except (ConfigError, M.CheckpointError, rewards.ConstraintError, data.DataError) as e:
        print0(f"error: {e}")
        raise SystemExit(2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
