"""Fine-tune a LLaMA with L3M (or SFT, the minimax-Lagrangian baseline, or a reward model). One file.

    python train.py                                            # one CPU process: the demo (L3M, length band)
    torchrun --standalone --nproc_per_node=2 train.py          # two CPU processes (gloo), same result
    torchrun --standalone --nproc_per_node=8 train.py --init=ckpt/llama-7b --data=ultrachat.jsonl \\
        --batch_size=64 --micro_batch=8 --lr=1e-6 --max_len=512 --max_new_tokens=512 \\
        --constraint="length>=50" --constraint="length<=100" --activation_checkpointing=True
    torchrun --standalone --nproc_per_node=8 train.py --method=reward --init=ckpt/llama-7b --data=HH_TRAIN_FILES \\
        --data_test=HH_TEST_FILES --epochs=2 --batch_size=64 --micro_batch=8 --lr=1e-6 --warmup=0.1 --max_len=1024 \\
        --eval_every=0.1 --activation_checkpointing=True --out_dir=out/rm_helpful   # App. A.1 (README: both RMs)

Read `run` first (set-up, then the loop), then its steps: `task_step` (heads), `constraint_step` (tails: Eq. 11
with Eq. 12) and `reward_step` (App. A.1). `python train.py --help` explains every flag. Choices the paper leaves open:
- "One epoch": the coin gives half the steps to the task, so a constrained run takes 2 × (task batches per epoch)
  steps; task and prompt batches come from two independent streams over the training split.
- The coin is a function of (seed, step), a row's sampling noise of (seed, step, global row): every rank flips the
  same coin, a response does not depend on how rows are split over ranks, and a resume needs no RNG state.
- Rollouts, evaluation and reward scoring run on weights gathered once (one copy per rank, 14 GB at 7B), not sharded in
  lock-step (an all-gather per block and token): no collective in the decode loop, so ranks may stop at different steps.
- One learning-rate schedule (linear warm-up, cosine to 0) and one AdamW state for both kinds of step; weight decay on
  the matrices only (transformers' Trainer). Sampling: top-p 0.9 alone (App. A); --top_k=50 adds transformers' top-k.
- Reward models (App. A.1) train in the same loop with `reward_step` as their one kind of step: the optimiser,
  schedule, clipping, checkpoints and resume a second loop would only repeat.
"""
import contextlib
import datetime
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import l3m
import rewards
from model import (CheckpointError, ModelArgs, Transformer, atomic_folder, check_state_dict, decode_one_token,
                   find_tokenizer, generate, load_tokenizer, read_checkpoint, save_checkpoint)

def flag(default, help: str):
    """A Config field with the help text `python train.py --help` prints; each Config gets its own copy of a list."""
    return field(default_factory=lambda: list(default) if isinstance(default, list) else default,
                 metadata={"help": help})

@dataclass
class Config:
    # what to train, on what
    method: str = flag("l3m", "sft (task steps only) | l3m (the paper) | mm (minimax Lagrangian) | reward (App. A.1)")
    out_dir: str = flag("out/l3m", "where checkpoints, ledger.jsonl and report.json go")
    init: str = flag("demo", "our checkpoint folder (model.py convert); 'scratch'; 'demo': the demo base, cached")
    data_dir: str = flag("out", "where the demo data, its tokenizer and the demo base model are cached")
    data: str = flag("demo", "'demo', or UltraChat JSONL(.gz) files, or chatterbot-corpus YAML files or folders "
                             "(HH-RLHF JSONL for --method=reward), comma-separated")
    data_test: str = flag("", "HH-RLHF test file(s) for --method=reward (with demo data: the demo's)")
    demo_reward: str = flag("informative", "the demo preference set --method=reward learns: informative | cautious")
    constraint: list = flag(["length>=20", "length<=35"], "E[r] >= b and the like (rewards.py); repeat the flag")
    reward_model: list = flag([], "NAME=FOLDER: a learned reward a constraint may name; repeat the flag")
    val: float = flag(200.0, "validation examples (a count, or a fraction if < 1)")
    test: float = flag(200.0, "test examples (a count, or a fraction if < 1)")
    max_len: int = flag(512, "drop (prompt, response) pairs longer than this many tokens (App. A: 512)")
    chat_template: str = flag("plain", "the model's chat format: plain (Human: … Assistant:, the demo's) | llama2 "
                              "([INST] … [/INST], LLaMA-2-chat) | chatml (<|im_start|>, <|im_end|> as added tokens)")
    system_prompt: str = flag("", "llama2, chatml: a system prompt at the start of every dialogue")
    # model shape and schedule of the demo's pretraining (--init=scratch)
    base_epochs: float = flag(3.0, "epochs of the demo base model's pretraining")
    base_lr: float = flag(3e-3, "learning rate of the demo base model's pretraining")
    dim: int = flag(128, "model width (--init=scratch)")
    n_layers: int = flag(4, "transformer blocks (--init=scratch)")
    n_heads: int = flag(4, "attention heads (--init=scratch)")
    n_kv_heads: int = flag(2, "key/value heads, grouped-query attention (--init=scratch)")
    # optimisation (App. A); the defaults are the CPU demo's
    epochs: float = flag(1.0, "passes over the task data (App. A: 1)")
    steps: int = flag(0, "> 0: this many steps, overriding --epochs")
    batch_size: int = flag(16, "global mini-batch, reached by accumulating micro-batches (App. A: 64)")
    micro_batch: int = flag(16, "rows per rank and forward")
    lr: float = flag(2e-4, "peak learning rate of AdamW (App. A: 1e-6 at 7B)")
    weight_decay: float = flag(0.1, "AdamW weight decay of the matrices; none on norms (App. A: 0.1)")
    warmup: float = flag(0.05, "linear warm-up, as a share of the steps, then cosine to 0 (App. A: 0.05)")
    grad_clip: float = flag(1.0, "gradient-norm clip, applied to each kind of step on its own (§5.4)")
    # L3M (§5)
    mu_0: float = flag(1.0, "barrier parameter µ at the first step (§5.1)")
    mu_T: float = flag(1e-6, "barrier parameter µ at the last step; µ decays exponentially in between (§5.1)")
    ema_alpha: float = flag(0.1, "smoothing factor α of the EMA Ĉ of each constraint (§5.4)")
    eta_lam: float = flag(0.1, "step size η_λ of the multipliers, --method=mm only")
    top_p: float = flag(0.9, "nucleus of the rollouts' sampling (App. A: 0.9)")
    top_k: int = flag(0, "> 0: sample among the k likeliest tokens, then their nucleus (transformers' default: 50)")
    temperature: float = flag(1.0, "of the rollouts; 0: greedy (log-probs then at temperature 1)")
    max_new_tokens: int = flag(128, "longest rollout, in tokens")
    compile: bool = flag(False, "torch.compile the rollouts' decode step (traced once; CUDA graphs on a GPU)")
    show: int = flag(3, "sampled test responses printed before and after")
    # run
    eval_every: float = flag(100.0, "validate every this many steps; < 1: this share of an epoch; 0: not at all")
    eval_before: bool = flag(True, "evaluate on the test split before training too (the 'before' column)")
    ckpt_every: int = flag(100, "checkpoint every this many steps; 0: only the final model")
    resume: bool = flag(False, "continue from out_dir/ckpt")
    overwrite: bool = flag(False, "replace a run already in out_dir (without it, such a run is refused)")
    stop_after: int = flag(0, "> 0: checkpoint and stop after this step (a time slice; continue with --resume)")
    seed: int = flag(0, "of the data order, the coin, the sampling and a scratch model's weights")
    data_seed: int = flag(0, "of the demo data, the UltraChat turn kept and the train/val/test split")
    device: str = flag("auto", "auto | cpu | cuda")
    activation_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass")

def true_false(text: str) -> bool:
    """A bool flag's value: True or False, in any case (anything else raises a ValueError, which argparse reports)."""
    return ["false", "true"].index(text.lower()) == 1

def parse_config(argv) -> Config:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        default = f.default_factory()
        help = f"{f.metadata['help']} (default: {default})"
        if isinstance(default, list):
            p.add_argument(f"--{f.name}", action="append", help=help)
        elif isinstance(default, bool):
            p.add_argument(f"--{f.name}", type=true_false, default=default, help="True/False: " + help)
        else:
            p.add_argument(f"--{f.name}", type=type(default), default=default, help=help)
    return Config(**{k: v for k, v in vars(p.parse_args(argv)).items() if v is not None})

class Run:
    """Everything the steps share, built once: tokenizer, sharded model, constraints, data, AdamW."""

    def __init__(self, cfg: Config, device):
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % world:
            raise ConfigError(f"--batch_size={cfg.batch_size} does not split over {world} ranks")
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device
        if cfg.init == "scratch":
            self.tok_path = str(data.prepare_demo(cfg.data_dir, cfg.data_seed).tokenizer)
        else:
            self.tok_path = find_tokenizer(cfg.init)
        self.tok = load_tokenizer(self.tok_path)
        data.stop_id(self.tok, cfg.chat_template)  # ChatML: the tokenizer must have its markers
        self.model, self.args = build_model(cfg, device, cfg.init, self.tok.vocab_size)
        # model.decode_one_token has the same shapes at every token: traced once, whatever the batch and length
        self.decode_step = torch.compile(decode_one_token, dynamic=True, mode="reduce-overhead" if
                                         device.type == "cuda" else None) if cfg.compile else decode_one_token
        learned = {}  # name -> rewards.LearnedReward, for constraints on learned rewards
        for name, _, folder in (s.partition("=") for s in cfg.reward_model if cfg.method != "reward"):
            rm, _ = build_model(cfg, device, folder, self.tok.vocab_size, train=False)
            learned[name] = rewards.LearnedReward(rm, pad_id=self.tok.eos_id, micro_batch=cfg.micro_batch)
        self.reward_models = list(learned.values())
        self.constraints = [] if cfg.method == "reward" else \
            rewards.parse_constraints(cfg.constraint, {"length": rewards.length_reward, **learned})  # k of them
        self.train, self.val, self.test = load_data(cfg, self.tok)
        self.task_stream = Stream(len(self.train), cfg.batch_size // world, cfg.seed, rank, world)  # heads
        self.prompt_stream = Stream(len(self.train), cfg.batch_size // world, cfg.seed + 1, rank, world)  # tails
        constrained = cfg.method in ("l3m", "mm")
        per_epoch = self.task_stream.per_epoch * (1 + constrained)  # steps; the coin gives half to the task
        self.total = cfg.steps or max(1, round(cfg.epochs * per_epoch))
        self.eval_every = round(cfg.eval_every) if cfg.eval_every >= 1 else math.ceil(cfg.eval_every * per_epoch)
        self.mult = l3m.Multipliers(len(self.constraints), cfg.method, cfg.eta_lam if cfg.method == "mm" else None,
                                    cfg.ema_alpha) if constrained else None  # Ĉ and λ̂ (MM: λ)
        if cfg.method == "l3m" and schedule_too_short(cfg, self.total):
            lam_T = 1 / (max(1, len(self.constraints)) * cfg.mu_T)
            print0(f"warning: µ falls from {cfg.mu_0:g} to {cfg.mu_T:g} in {self.total} steps: λ̂ of an active "
                   f"constraint, 1/(kµ), grows faster than Ĉ can follow it (to {lam_T:.2g} at the end). Train for "
                   "more steps (--steps, --epochs) or raise --mu_T.")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.ledger = os.path.join(cfg.out_dir, "ledger.jsonl")
        self.reports, self.best = {}, None  # evaluations so far; a reward model's best validation accuracy
        os.makedirs(cfg.out_dir, exist_ok=True)
        print0(f"config: {json.dumps(asdict(cfg))}\nmodel: {self.args}\n{self.total} steps, "
               f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test, global batch "
               f"{cfg.batch_size} = {world} rank(s) × {cfg.batch_size // world}")

def schedule_too_short(cfg: Config, total: int) -> bool:
    """Whether µ falls by more than ×1/1.15 per step (§5.1): 1 -> 1e-6 in fewer than ~100 steps."""
    return (cfg.mu_0 / cfg.mu_T) ** (1 / max(1, total - 1)) > 1.15

def param_groups(model, weight_decay: float) -> list:
    """AdamW's groups as transformers' Trainer makes them (App. A: its defaults): weight decay on the matrices,
    the embedding and the output layer included; none on the RMSNorm weights (LLaMA has no biases)."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]

def run(cfg: Config, device) -> dict:
    """One training run as configured. Returns the final report (the same on every rank)."""
    r = Run(cfg, device)
    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())  # preemption: finish the step, checkpoint, exit
    start = load_train_state(r) if cfg.resume else 0
    open_ledger(r, start)
    if start == 0 and cfg.eval_before:
        report_before(r)
    bar = tqdm(range(start, r.total), initial=start, total=r.total, disable=dist.get_rank() != 0, dynamic_ncols=True)
    for step in bar:
        # the barrier parameter: one stochastic step per µ, from µ_0 at step 0 to µ_T at the last (§5.1)
        mu = l3m.mu_at(step, max(1, r.total - 1), cfg.mu_0, cfg.mu_T)
        # the learning rate: linear warm-up, then cosine (App. A)
        lr = lr_at(step, r.total, cfg)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        # heads a task step, tails a constraint step: the same coin on every rank (§5.4)
        t0 = time.perf_counter()
        kind = step_kind(cfg, step)
        if kind == "constraint":
            rec = constraint_step(r, step, mu)
        else:
            rec = task_step(r) if kind == "task" else reward_step(r)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the optimizer's kernels run on after step() returns
        rec["t_train"] = time.perf_counter() - t0 - rec.get("t_sample", 0.0)
        preempted = rec.pop("preempted", False)  # a SIGTERM on any rank, agreed on in clip_and_step
        # one ledger line, the progress bar
        log_step(r, bar, {"step": step, "kind": kind, "mu": mu, "lr": lr, **rec})
        # validate, checkpoint, or stop after this step (a time slice)
        steps_done = step + 1
        if r.eval_every and steps_done % r.eval_every == 0 and steps_done < r.total:
            validate(r, f"val @ {steps_done}")
        stop = steps_done == cfg.stop_after < r.total  # at the last step, the run simply finishes
        if (cfg.ckpt_every and steps_done % cfg.ckpt_every == 0 or stop or preempted) and steps_done < r.total:
            save_train_state(r, steps_done)
        if stop:
            print0(f"stopped after step {steps_done}; continue with --resume=True")
            return r.reports
        if preempted and steps_done < r.total:
            print0(f"SIGTERM: checkpointed after step {steps_done} in {cfg.out_dir}/ckpt; continue with the same "
                   "flags and --resume=True")
            raise SystemExit(143)
    bar.close()
    return finish(r)

def step_kind(cfg: Config, step: int) -> str:
    """'task' or 'constraint' by the fair coin of (seed, step) (§5.4; the top says why); SFT: 'task'; RMs: 'reward'."""
    if cfg.method in ("sft", "reward"):
        return "task" if cfg.method == "sft" else "reward"
    heads = l3m.Multipliers.coin(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
    return "task" if heads else "constraint"

def task_step(r: Run) -> dict:
    """Heads (§5.4): one step on the task loss L(θ) = mean −ℓ̄_θ(y|x) over a task mini-batch (Eq. 5)."""
    batch = [r.train[i] for i in r.task_stream.next()]
    tokens, mask = (x.to(r.device) for x in data.task_batch(batch, pad_id=r.tok.eos_id))  # (B, T)
    loss = 0.0
    for j, share in micro_batches(len(tokens), r.cfg.micro_batch):
        # one reduce-scatter, after the last micro-batch; until then FSDP2 sums the unsharded gradients in place
        r.model.set_requires_gradient_sync(j.stop == len(tokens))
        part = share * l3m.task_loss(l3m.logp_norm(r.model(tokens[j]), tokens[j], mask[j]))
        part.backward()
        loss += part.item()
    # clip the task gradient on its own (§5.4), then AdamW
    real = sum(len(e.prompt) + len(e.response) for e in batch)  # this rank's tokens, padding left out (MFU)
    return {**clip_and_step(r, loss), "tokens": real}

def constraint_step(r: Run, step: int, mu: float) -> dict:
    """Tails (§5.4): one step along −Σ_i λ̂_i·∇C_i, the constraint part of ∇G_µ (Eq. 11)."""
    cfg, t0 = r.cfg, time.perf_counter()
    # x: this rank's prompts; y ~ π_θ(·|x) with top-p (App. A), sampled on gathered weights
    rows = r.prompt_stream.next()  # global indices of the rows: they key the rows' sampling noise
    prompts = [r.train[i].prompt.tolist() for i in rows]
    with gathered(r.model) as (policy,):
        samples = rollout(policy, r.tok, prompts, cfg, row_generators(cfg.seed, step, rows), r.decode_step)
    # c_i = b_i − r_i(y|x), per sample and constraint (Eq. 5)
    c = costs(r.constraints, r.reward_models, samples).to(r.device)  # (B, k)
    # Ĉ_i ← (1 − α)·Ĉ_i + α·(mean of c_i over the global batch), one all-reduce (§5.4)
    C_hat = r.mult.observe(c, all_reduce_sum)  # (k,)
    if C_hat is None:  # a non-finite reward on some rank: every rank skips the step, Ĉ and λ untouched
        return {"loss": math.nan, "grad_norm": math.nan, "skipped": True, **rollout_stats(samples)}
    # λ̂_i = µ / (k·max(−Ĉ_i, µ²)) = B'_{µ,µ²}(Ĉ_i)/k (§5.2); MM: its learned λ_i
    lam = r.mult.lam(mu).to(r.device)  # (k,) float32, detached
    t_sample = time.perf_counter() - t0
    # surrogate Σ_i λ̂_i·mean_b(c_bi·ℓ̄_θ(y_b)): with c and λ̂ held constant its gradient estimates
    # Σ_i λ̂_i·∇C_i (Eq. 12), with ∇ℓ̄_θ for ∇log π_θ (§5.4)
    tokens, mask = (x.to(r.device) for x in data.response_batch(prompts, samples.responses, pad_id=r.tok.eos_id))
    loss = 0.0
    for j, share in micro_batches(len(tokens), cfg.micro_batch):
        r.model.set_requires_gradient_sync(j.stop == len(tokens))
        logp = l3m.logp_norm(r.model(tokens[j]), tokens[j], mask[j], cfg.temperature or 1.0)  # ℓ̄_θ(y|x), (b,)
        part = share * l3m.reinforce_surrogate(logp, c[j], lam)
        part.backward()
        loss += part.item()
    # clip the constraint gradient on its own (§5.4), then AdamW
    return {**clip_and_step(r, loss), "C": r.mult.ema.batch_mean.tolist(), "C_hat": C_hat.tolist(), "lam": lam.tolist(),
            "barrier": l3m.barrier(C_hat, mu, mu ** 2).tolist(),  # B_{µ,µ²}(Ĉ_i), Eq. 9
            "branch": ["log" if C <= -mu ** 2 else "linear" for C in C_hat.tolist()],
            "t_sample": t_sample, **rollout_stats(samples)}

def reward_step(r: Run) -> dict:
    """App. A.1: one step on the Bradley–Terry loss −log σ(r_φ(y⁺|x) − r_φ(y⁻|x)), with r_φ = ℓ̄_φ."""
    batch = [r.train[i] for i in r.task_stream.next()]
    loss = 0.0
    for j, share in micro_batches(len(batch), r.cfg.micro_batch):
        r.model.set_requires_gradient_sync(j.stop == len(batch))
        part = share * rewards.bradley_terry_loss(*rewards.preference_rewards(r.model, batch[j], pad_id=r.tok.eos_id))
        part.backward()
        loss += part.item()
    return clip_and_step(r, loss)

def micro_batches(n: int, micro: int) -> list:
    """(slice, share) per micro-batch of a local batch of n rows: the shares weight micro-batch means into
    the batch mean. Every rank holds n rows, so FSDP's gradient average makes it the global batch mean."""
    return [(slice(i, min(i + micro, n)), (min(i + micro, n) - i) / n) for i in range(0, n, micro)]

def clip_and_step(r: Run, loss: float) -> dict:
    """Clip the accumulated gradient at --grad_clip (§5.4), take the AdamW step, clear the gradient. Loss and norm are
    all-reduced, so a non-finite one on any rank skips the step on every rank; the loss's all-reduce also carries
    whether a rank has received SIGTERM, so that all ranks stop after the same step."""
    loss, sigterms = all_reduce_sum(torch.tensor([loss, float(_SIGTERM.is_set())], dtype=torch.float64)).tolist()
    loss /= dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.cfg.grad_clip)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # before clipping
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": norm, "skipped": skipped, "preempted": sigterms > 0}

_SIGTERM = threading.Event()  # set by run's SIGTERM handler; read at the end of each step (clip_and_step)

def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up over cfg.warmup of the steps, then cosine decay to 0 (App. A)."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

def row_generators(seed: int, step: int, rows, evaluation: bool = False):
    """One generator per row, keyed by (seed, step, the row's global index): ranks sample independently.
    Evaluations reuse the same keys every time, so before/after comparisons share their sampling noise."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(evaluation), step, int(i)])
                                              .generate_state(1)[0])) for i in rows]

def rollout(model, tok, prompts, cfg: Config, generators, step=decode_one_token):
    """Sample responses with top-p (App. A); call inside `gathered(model)`. step: the decode step (Run.decode_step)."""
    responses, ended = generate(model, prompts, cfg.max_new_tokens, data.stop_id(tok, cfg.chat_template),
                                cfg.temperature, cfg.top_p, generators, cfg.top_k, step)
    return rewards.Samples.from_generate(prompts, responses, ended, tok)

def costs(constraints, reward_models, samples) -> torch.Tensor:
    """c_i = b_i − r_i(y|x) for every constraint, (B, k), k ≥ 0; learned rewards score on gathered weights."""
    if not constraints:
        return torch.zeros(len(samples.prompts), 0)
    with gathered(*(rm.model for rm in reward_models)):
        return torch.stack([con.cost(samples) for con in constraints], 1)  # (B, k)

def rollout_stats(samples) -> dict:
    """Mean, p10 and p90 of the global batch's response lengths, and its share cut at --max_new_tokens."""
    lengths = rewards.length_reward(samples)  # (B,)
    cut = torch.tensor([not e for e in samples.ended], dtype=torch.float32)  # (B,)
    both = all_gather_cat(torch.stack([lengths, cut], 1))  # (global B, 2)
    p10, p90 = torch.quantile(both[:, 0], torch.tensor([0.1, 0.9])).tolist()
    return {"len_mean": both[:, 0].mean().item(), "len_p10": p10, "len_p90": p90, "truncated": both[:, 1].mean().item()}

def open_ledger(r: Run, start: int):
    """The ledger keeps exactly the steps before `start` (all of a resumed run's, none of a new run's)."""
    if dist.get_rank() == 0:
        kept = Path(r.ledger).read_text().splitlines(keepends=True)[:start] if os.path.isfile(r.ledger) else []
        Path(r.ledger).write_text("".join(kept))

def log_step(r: Run, bar, rec: dict):
    if r.device.type == "cuda":
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(r.device) / 2 ** 30
    if dist.get_rank() == 0:
        with open(r.ledger, "a") as f:
            f.write(json.dumps(rec) + "\n")
        show = {"loss": f"{rec['loss']:.3f}"}
        if r.mult is not None and r.mult.ema.value is not None:
            show.update({"µ": f"{rec['mu']:.1e}", "C": [round(x, 2) for x in r.mult.ema.value.tolist()],
                         "λ": [f"{x:.1e}" for x in r.mult.lam(rec["mu"]).tolist()]})
        if "len_mean" in rec:
            show["len"] = f"{rec['len_mean']:.1f}"
        bar.set_postfix(show, refresh=False)

def evaluate(r: Run, examples, split: str, model=None) -> dict:
    """Task perplexity (−ℓ̄ per sequence), rollout lengths and each constraint's mean reward on a split, or a reward
    model's pairwise accuracy. Examples are dealt round-robin to the ranks and padded to equal counts (the pads are
    dropped from the statistics), then gathered: exact, and alike on every rank."""
    rank, world, cfg, model = dist.get_rank(), dist.get_world_size(), r.cfg, model or r.model
    per_rank = math.ceil(len(examples) / world)
    idx = [min(rank + world * j, len(examples) - 1) for j in range(per_rank)]
    keep = all_gather_cat(torch.tensor([rank + world * j < len(examples) for j in range(per_rank)]))
    rows, shown = [], []  # per example: (−ℓ̄, |y|, ended, c_1 … c_k), or a reward model's (r(y⁺|x), r(y⁻|x))
    with gathered(model) as (plain,):
        for i in range(0, per_rank, cfg.micro_batch):
            batch = [examples[j] for j in idx[i:i + cfg.micro_batch]]
            if cfg.method == "reward":
                rows.append(torch.stack(rewards.preference_rewards(plain, batch, pad_id=r.tok.eos_id), 1).float().cpu())
                continue
            tokens, mask = (x.to(r.device) for x in data.task_batch(batch, pad_id=r.tok.eos_id))
            nll = -l3m.logp_norm(plain(tokens), tokens, mask).float().cpu()
            samples = rollout(plain, r.tok, [e.prompt.tolist() for e in batch], cfg,
                              row_generators(cfg.seed, 0, idx[i:i + cfg.micro_batch], evaluation=True), r.decode_step)
            lengths, ended = rewards.length_reward(samples), torch.tensor(samples.ended, dtype=torch.float32)
            c = costs(r.constraints, r.reward_models, samples)  # (b, k)
            rows.append(torch.cat([torch.stack([nll, lengths, ended], 1), c], 1))
            if i == 0:  # a few of rank 0's responses: the same prompts and sampling noise at every evaluation
                shown = [{"prompt": p, "response": y, "length": int(n)} for p, y, n in
                         zip(samples.prompt_texts[:cfg.show], samples.response_texts[:cfg.show], lengths)]
    rows = all_gather_cat(torch.cat(rows))[keep]  # one gather; grouped by rank, which no statistic below minds
    if cfg.method == "reward":
        return {"split": split, "n": len(rows), "accuracy": rewards.pairwise_accuracy(rows[:, 0], rows[:, 1])}
    nll, lengths, ended, c = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:]  # c_i = b_i − r_i, (n, k)
    q = torch.quantile(lengths, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    C, se = c.mean(0).tolist(), (c.std(0) / math.sqrt(len(c))).tolist()  # C_i = E[b_i − r_i] ± its std. error
    constraints = {con.name: {"b": con.b, "reward_mean": con.b - Ci, "C": Ci, "se": s, "satisfied": Ci <= 0,
                              "verdict": rewards.verdict(Ci, s)} for con, Ci, s in zip(r.constraints, C, se)}
    return {"split": split, "n": len(rows), "perplexity_mean": nll.mean().item(), "perplexity_std": nll.std().item(),
            "length_mean": lengths.mean().item(), "length_se": (lengths.std() / math.sqrt(len(lengths))).item(),
            **dict(zip(["length_p10", "length_q1", "length_median", "length_q3", "length_p90"], q)),
            "ended_share": ended.mean().item(), "constraints": constraints, "samples": shown}

def report_before(r: Run):
    """The model before training: a reward model's validation accuracy, or the test split (none for a random init)."""
    if r.cfg.method == "reward":
        r.reports["val_accuracy_before"] = evaluate(r, r.val, "val (before)")["accuracy"]
        print0(f"val accuracy before training: {r.reports['val_accuracy_before']:.3f}")
    elif r.cfg.init != "scratch":
        r.reports["before"] = evaluate(r, r.test, "test (before)")
        print0(format_report(r.reports["before"]))

def validate(r: Run, split: str):
    """A validation report; a reward model also keeps its best version so far (App. A.1)."""
    v = evaluate(r, r.val, split)
    print0(format_report(v))
    if r.cfg.method == "reward" and (r.best is None or v["accuracy"] > r.best):
        r.best = v["accuracy"]
        save_final(r, "best")

def finish(r: Run) -> dict:
    """The final report: the test split after training beside the one before, or a reward model's accuracy."""
    cfg, reports = r.cfg, r.reports
    if cfg.method == "reward":
        validate(r, "val (final)")
        reports["val_best_accuracy"] = r.best
        if r.test:
            best, _ = build_model(cfg, r.device, os.path.join(cfg.out_dir, "best"), r.tok.vocab_size, train=False)
            reports["test_accuracy"] = evaluate(r, r.test, "test (best)", best)["accuracy"]
        print0(f"reward model: best val accuracy {r.best:.3f}, "
               f"test accuracy {reports.get('test_accuracy', float('nan')):.3f}")
    else:
        reports["after"] = evaluate(r, r.test, "test (after)")
        if r.mult is not None and r.mult.ema.value is not None:
            reports["lam_hat"] = r.mult.lam(cfg.mu_T).tolist()
        print0(format_comparison(reports["before"], reports["after"], cfg.method, reports.get("lam_hat"))
               if "before" in reports else format_report(reports["after"]))
    reports["bytes_per_rank"] = held_bytes(r)
    print0("held by each rank (FSDP2 shards: 1/world of the whole): {parameters:,} bytes of parameters, "
           "{optimizer:,} of AdamW state".format(**reports["bytes_per_rank"]))
    save_final(r, "final")
    if dist.get_rank() == 0:
        Path(cfg.out_dir, "report.json").write_text(json.dumps({"config": asdict(cfg), **reports}, indent=2))
    return reports

def held_bytes(r: Run) -> dict:
    """Bytes of the parameters and of the AdamW state that this rank holds (its shards of the DTensors)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    return {"parameters": sum(local(p).nbytes for p in r.model.parameters()),
            "optimizer": sum(local(v).nbytes for s in r.optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v) and v.ndim > 0)}  # not the scalar step counts

MARK = {"satisfied": "✓", "within noise": "≈", "violated": "✗"}  # rewards.verdict, C ± its standard error

def format_comparison(before: dict, after: dict, method: str, lam_hat=None) -> str:
    """The test split before and after fine-tuning, side by side (the paper's Fig. 2 columns), then samples."""
    def col(r):
        rows = [f"{r['length_mean']:.1f}", f"{r['length_q1']:.0f} / {r['length_median']:.0f} / {r['length_q3']:.0f}",
                f"{r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f}", f"{100 * r['ended_share']:.0f}%"]
        return rows + [f"{c['C']:+.2f} ± {c['se']:.2f} {MARK[c['verdict']]}" for c in r["constraints"].values()]
    names = ["mean length (tokens)", "length quartiles", "task perplexity (−ℓ̄)", "ended with EOS"]
    names += [f"C = E[b − r]  {n}" for n in before["constraints"]]
    lines = [f"{'test split (' + str(before['n']) + ' prompts)':32s} {'before':>18s} {'after (' + method + ')':>18s}"]
    lines += [f"{n:32s} {b:>18s} {a:>18s}" for n, b, a in zip(names, col(before), col(after))]
    if lam_hat is not None:
        lines.append(f"{'final λ̂ (µ = µ_T)':32s} {'':>18s} {', '.join(f'{x:.2g}' for x in lam_hat):>18s}")
    for b, a in zip(before["samples"], after["samples"]):
        prompt = re.split(r"Human:|\[INST\]|<\|im_start\|>user", b["prompt"])[-1]  # the last user turn
        prompt = re.sub(r"Assistant:|\[/INST\]|<\|im_end\|>|<\|im_start\|>assistant", "", prompt).strip()
        lines += ["", f"prompt: {prompt}", f"  before ({b['length']:3d} tokens): {b['response']}",
                  f"  after  ({a['length']:3d} tokens): {a['response']}"]
    return "\n".join(lines)

def format_report(r: dict) -> str:
    if "accuracy" in r:
        return f"{r['split']} ({r['n']} pairs): accuracy {r['accuracy']:.3f}"
    lines = [f"{r['split']} ({r['n']} examples): perplexity {r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f}, "
             f"length mean {r['length_mean']:.1f} (quartiles {r['length_q1']:.0f} / {r['length_median']:.0f} / "
             f"{r['length_q3']:.0f}), ended with EOS {100 * r['ended_share']:.0f}%"]
    for name, c in r["constraints"].items():
        lines.append(f"  {name:24s} mean reward {c['reward_mean']:9.3f} ± {c['se']:.3f}  b = {c['b']:9.3f}  "
                     f"{MARK[c['verdict']]} {c['verdict']}")
    return "\n".join(lines)

def save_train_state(r: Run, steps_done: int):
    """Every rank's shards go to rank 0's temporary folder, which then replaces out_dir/ckpt (model.atomic_folder)."""
    model_sd, optim_sd = get_state_dict(r.model, r.optimizer)
    state = {"step": steps_done, "task_pos": r.task_stream.position, "prompt_pos": r.prompt_stream.position,
             "best": r.best, "reports": r.reports, "config": asdict(r.cfg),
             "multipliers": r.mult.state_dict() if r.mult is not None else None}
    rank0, ckpt = dist.get_rank() == 0, os.path.join(r.cfg.out_dir, "ckpt")
    for stale in glob.glob(f"{ckpt}.tmp*") if rank0 else []:  # the half-written folder of a killed save
        shutil.rmtree(stale)
    with atomic_folder(ckpt) if rank0 else contextlib.nullcontext() as tmp:
        folder = [tmp]
        dist.broadcast_object_list(folder, src=0)  # rank 0's temporary folder, for every rank
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder[0])
        if rank0:
            torch.save(state, os.path.join(tmp, "state.pt"))
        dist.barrier()  # every rank's shards are on disk before rank 0 renames the folder
    dist.barrier()

def load_train_state(r: Run) -> int:
    """Restore the model, AdamW, the data positions, the multipliers and the reports; returns the step."""
    folder = os.path.join(r.cfg.out_dir, "ckpt")  # check_config made sure it is there
    model_sd, optim_sd = get_state_dict(r.model, r.optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)  # in place, into these two dicts
    set_state_dict(r.model, r.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=False)
    r.task_stream.position, r.prompt_stream.position = state["task_pos"], state["prompt_pos"]
    r.best, r.reports = state["best"], state["reports"]
    if r.mult is not None:
        r.mult.load_state_dict(state["multipliers"])
    print0(f"resumed from {folder} at step {state['step']}")
    return state["step"]

def save_final(r: Run, name: str):
    """The model in model.py's checkpoint format (loadable by model.load_model and `python model.py sample`)."""
    sd = get_model_state_dict(r.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_checkpoint(sd, os.path.join(r.cfg.out_dir, name), r.args, r.tok_path)
    dist.barrier()

_COMM_DEVICE = torch.device("cpu")  # NCCL reduces CUDA tensors only, gloo CPU ones

def setup_distributed(device: str):
    """(rank, world size, device): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; a plain process is a world of one."""
    global _COMM_DEVICE
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank}, but torch sees {torch.cuda.device_count()} GPU(s) here: start "
                              "at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        _COMM_DEVICE = torch.device("cuda", local_rank)
    alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}  # no torchrun
    # One hour, not NCCL's 10 minutes: the other ranks wait at a barrier while rank 0 writes a 7B model's 27 GB
    # final model.pth (save_final); a rank that truly hangs is also found an hour late.
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                            device_id=_COMM_DEVICE if device == "cuda" else None, **alone)
    return dist.get_rank(), dist.get_world_size(), torch.device(device, local_rank if device == "cuda" else None)

def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank, also before the process group exists
        print(*a, **k, flush=True)

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over ranks, in place (also the all-reduce hook of l3m.ConstraintEMA); returns t."""
    x = t.to(_COMM_DEVICE)
    dist.all_reduce(x)
    return t.copy_(x) if x is not t else t

def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank, in rank order; on the CPU."""
    x = t.to(_COMM_DEVICE).contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out).cpu()

def build_model(cfg: Config, device, init: str, tokenizer_vocab: int, train: bool = True):
    """Our checkpoint folder (or 'scratch') -> a sharded model on device, weights loaded strictly."""
    if init == "scratch":
        args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         vocab_size=tokenizer_vocab, multiple_of=32, max_seq_len=cfg.max_len + cfg.max_new_tokens)
        sd = Transformer(args).init_weights(cfg.seed).state_dict()
    else:
        args, sd = read_checkpoint(init)
        if args.vocab_size != tokenizer_vocab:
            raise CheckpointError(f"{init}: vocab_size={args.vocab_size} but the tokenizer has {tokenizer_vocab}")
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(sd, model, init)
    # FSDP2: shard each block, then the root (embedding, final norm, output), over all ranks of a mesh on the device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                              reduce_dtype=torch.float32)
    for block in model.layers:
        if train and cfg.activation_checkpointing:  # recompute each block's activations in the backward pass
            block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # the root keeps its weights after forward: backward needs them at once
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model.to_empty(device=device)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
    return model.train(train), args

@contextlib.contextmanager
def gathered(*models):
    """All-gather every shard once and keep the full weights for a stretch of no-grad forwards; yields one `bare` view
    per model. Inside, forwards run no collective, so ranks may run different numbers of them (rollouts that stop
    early). On exit each unit gets back the setting build_model gave it and is resharded."""
    units = [(m, m is not model) for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    for m, _ in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield [bare(model) for model in models]
    finally:
        for m, reshard in units:
            m.set_reshard_after_forward(reshard, recurse=False)  # blocks reshard after forward, the root does not
            m.reshard()

def bare(model) -> Transformer:
    """A plain Transformer on the unsharded weights of an FSDP model inside `gathered`. Rollouts decode on it: through
    the FSDP model every token would run each block's FSDP hooks and, with --activation_checkpointing, checkpoint()
    (which saves the RNG state even under no_grad): host work per layer and token. Built on the meta device and
    assigned the same tensors, so it costs no memory; torch.compile traces it once, not once per instance."""
    with torch.device("meta"):
        plain = Transformer(model.args)
    plain.load_state_dict(dict(model.named_parameters()), strict=True, assign=True)
    return plain.eval()

class Stream:
    """Global batches of one split, epoch after epoch (data.batch_indices); `position` is all a resume needs."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.n, self.bs, self.where = n, batch_size, {"seed": seed, "rank": rank, "world_size": world}
        self.per_epoch, self.position = data.num_batches(n, batch_size, world), 0

    def next(self) -> np.ndarray:
        self.position += 1
        return data.batch_indices(self.n, self.bs, self.position - 1, **self.where)

def load_data(cfg: Config, tok) -> tuple:
    """(train, val, test): UltraChat-style task pairs, or HH-style preference pairs for --method=reward."""
    demo = data.prepare_demo(cfg.data_dir, cfg.data_seed) if cfg.data == "demo" else None
    reading = {"max_tokens": cfg.max_len, "template": cfg.chat_template, "system": cfg.system_prompt}
    if cfg.method != "reward":
        read = data.read_task([demo.task] if demo else cfg.data.split(","), tok, seed=cfg.data_seed, **reading)
        print0(read)
        return data.split_dataset(read.examples, val=cfg.val, test=cfg.test, seed=cfg.data_seed)
    train_paths = [getattr(demo, f"{cfg.demo_reward}_train")] if demo else cfg.data.split(",")
    test_paths = [getattr(demo, f"{cfg.demo_reward}_test")] if demo else [p for p in cfg.data_test.split(",") if p]
    read = data.read_hh(train_paths, tok, **reading)
    print0(read)
    train, val, _ = data.split_dataset(read.examples, val=0.05, test=0, seed=cfg.data_seed)  # App. A.1: 5 % held out
    return train, val, data.read_hh(test_paths, tok, **reading).examples if test_paths else []

class ConfigError(ValueError):
    """A flag that cannot work."""

def check_config(c: Config):
    """Refuse a bad config before any work, in one message (every rank checks alike: all stop together)."""
    def need(path, what):
        if not os.path.exists(path):
            raise ConfigError(f"{what} {path!r} does not exist")
    for ok, name, allowed in [
            (c.method in ("sft", "l3m", "mm", "reward"), "method", "sft, l3m, mm or reward"),
            (c.batch_size > 0, "batch_size", "> 0"), (c.micro_batch > 0, "micro_batch", "> 0"),
            (c.batch_size % max(c.micro_batch, 1) == 0, "batch_size", f"a multiple of --micro_batch={c.micro_batch}"),
            (c.lr > 0, "lr", "> 0"), (c.weight_decay >= 0, "weight_decay", ">= 0"), (c.steps >= 0, "steps", ">= 0"),
            (0 <= c.warmup < 1, "warmup", "in [0, 1): a share of the steps"), (c.grad_clip > 0, "grad_clip", "> 0"),
            (c.epochs > 0 or c.steps > 0, "epochs", "> 0 (or --steps > 0)"), (c.max_len > 0, "max_len", "> 0"),
            (c.max_new_tokens > 0, "max_new_tokens", "> 0"), (0 < c.top_p <= 1, "top_p", "in (0, 1]"),
            (c.top_k >= 0, "top_k", ">= 0 (0: no top-k)"), (c.temperature >= 0, "temperature", ">= 0 (0: greedy)"),
            (c.mu_0 > 0, "mu_0", "> 0"), (0 < c.mu_T < c.mu_0, "mu_T", f"in (0, --mu_0={c.mu_0}): µ decays"),
            (0 < c.ema_alpha <= 1, "ema_alpha", "in (0, 1]"), (c.eta_lam > 0, "eta_lam", "> 0"),
            (c.val >= 0 and c.test >= 0, "val" if c.val < 0 else "test", ">= 0"),
            (min(c.eval_every, c.ckpt_every, c.stop_after, c.show) >= 0,
             "eval_every, --ckpt_every, --stop_after and --show", ">= 0"),
            (min(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.base_epochs, c.base_lr) > 0,
             "dim, --n_layers, --n_heads, --n_kv_heads, --base_epochs and --base_lr", "> 0"),
            (c.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda"),
            (c.chat_template in data.TEMPLATES, "chat_template", f"one of {', '.join(data.TEMPLATES)}"),
            (not c.system_prompt or c.chat_template != "plain", "system_prompt", "empty with --chat_template=plain")]:
        if not ok:
            value = getattr(c, name, None)
            raise ConfigError(f"--{name}" + ("" if value is None else f"={value}") + f" must be {allowed}")
    if c.resume:  # the flags that shape the run must be the checkpoint's; the rest may change
        ckpt = os.path.join(c.out_dir, "ckpt")
        for old in [] if os.path.isdir(ckpt) else glob.glob(f"{ckpt}.old*/state.pt"):  # killed between renames
            raise ConfigError(f"{ckpt} was being replaced when the run stopped; the previous checkpoint is whole in "
                              f"{os.path.dirname(old)}: rename it to {ckpt}, then resume")
        need(os.path.join(ckpt, "state.pt"), "--resume: the checkpoint")
        saved = torch.load(os.path.join(c.out_dir, "ckpt", "state.pt"), weights_only=False)["config"]
        free = {"out_dir", "init", "resume", "overwrite", "stop_after", "eval_every", "ckpt_every", "show", "device",
                "micro_batch", "activation_checkpointing"}  # out_dir: a run folder may be moved, then resumed
        changed = [f"--{k}={v!r} (the checkpoint's: {saved.get(k)!r})" for k, v in asdict(c).items()
                   if k not in free and saved.get(k) != v]
        if changed:
            raise ConfigError(f"--resume with flags other than the checkpoint's: {', '.join(changed)}")
    elif not c.overwrite and any(os.path.exists(os.path.join(c.out_dir, f)) for f in ("ledger.jsonl", "ckpt")):
        raise ConfigError(f"--out_dir={c.out_dir} holds a run: continue it with --resume=True, replace it with "
                          "--overwrite=True, or choose another --out_dir")
    if c.init not in ("demo", "scratch"):
        need(os.path.join(c.init, "args.json"), "--init checkpoint (convert it with `python model.py convert`):")
        if not find_tokenizer(c.init):
            raise ConfigError(f"--init={c.init} has no tokenizer: copy the model's tokenizer.model (sentencepiece) or "
                              "tokenizer.json (with its tokenizer_config.json) into the folder")
    if c.chat_template == "chatml" and c.init in ("demo", "scratch"):  # an --init model: data._chatml checks it
        raise ConfigError("--chat_template=chatml needs <|im_start|> and <|im_end|> among the tokenizer's added "
                          "tokens; the demo model has none")
    if c.data != "demo":
        tests = [p for p in c.data_test.split(",") if p] if c.method == "reward" else []
        for path in c.data.split(",") + tests:
            need(path, "data file")
    for spec in c.reward_model:
        name, eq, folder = spec.partition("=")
        if not eq or not name:
            raise ConfigError(f"--reward_model={spec!r}: expected NAME=FOLDER")
        need(os.path.join(folder, "args.json"), f"--reward_model {name}:")
    known = {"length": rewards.length_reward, **{s.partition("=")[0]: rewards.length_reward for s in c.reward_model}}
    rewards.parse_constraints(c.constraint, known)

DEMO_BASE = "demo_base_v2"  # v2: UltraChat turns drawn by the dialogue's text (data.read_ultrachat)

def demo_base(cfg: Config, device) -> str:
    """The demo's 'pretrained LLaMA': SFT from random weights on the demo data, run once and cached."""
    folder = os.path.join(cfg.data_dir, DEMO_BASE)
    if not os.path.isfile(os.path.join(folder, "args.json")):
        print0(f"pretraining the demo base model once, cached in {folder}")
        base = replace(cfg, method="sft", init="scratch", out_dir=folder + "_run", epochs=cfg.base_epochs, steps=0,
                       lr=cfg.base_lr, constraint=[], reward_model=[], resume=False, overwrite=True, eval_every=0,
                       ckpt_every=0)
        run(base, device)
        if dist.get_rank() == 0:
            os.rename(os.path.join(base.out_dir, "final"), folder)
        dist.barrier()
    return folder

def main(argv):
    cfg = parse_config(argv)
    try:
        check_config(cfg)
        rank, world, device = setup_distributed(cfg.device)
        if cfg.init == "demo":
            cfg = replace(cfg, init=demo_base(cfg, device))
        run(cfg, device)
    except (ConfigError, CheckpointError, rewards.ConstraintError, data.DataError) as e:
        print0(f"error: {e}")
        if int(os.environ.get("RANK", "0")) != 0:  # every rank fails alike; torchrun stops the others when one
            time.sleep(3)  # exits, so the rest wait a moment for rank 0, the one that prints, to say why
        raise SystemExit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1:])
