"""The L3M method (Dhillon et al., ICLR 2025): the relaxed log barrier, the µ schedule,
the EMA of the constraints, the Lagrange multipliers, length-normalised log-likelihoods,
the REINFORCE surrogate, and the minimax-Lagrangian (MM) baseline.

The problem (Eq. 5), with c_i = b_i − r_i(y|x):

    minimise L(θ) = E[−ℓ̄_θ(y|x)]   subject to   C_i(θ) = E_{y~π_θ}[c_i] ≤ 0,  i = 1..k

One step of the procedure (§5.1, §5.4); train.py writes it out as run, task_step and
constraint_step:

    mu = mu_at(step, total_steps - 1)    # step 0 uses µ_0 = 1, the last µ_T = 1e-6
    if coin(generator):                  # heads: task step (the coin lives in train.py)
        loss = task_loss(logp_norm(model(tokens), tokens, mask))
    else:                                # tails: constraint step on sampled y
        c = b - r                        # (B, k)
        mult.observe(c, all_reduce)      # Ĉ ← EMA over the global batch
        logp = logp_norm(model(tokens), tokens, mask, temperature)
        loss = reinforce_surrogate(logp, c, mult.lam(mu))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # each kind on its own
    optimizer.step()
    optimizer.zero_grad()

Where this departs from the paper, or fixes what it leaves open:
- Top-p. Responses are sampled from the top-p nucleus of softmax(logits / T), but ℓ̄
  is the log-likelihood under the full softmax(logits / T), as the paper describes.
  Per token,
      log q(y_t) = log π(y_t) − log Π_t,   Π_t = π(nucleus_t) ≥ p,
  so the gradient is off from the nucleus sampler's REINFORCE gradient by
      E_q[c·mean_t ∇log Π_t]
  which is zero at p = 1, and small while 1 − Π_t ≤ 1 − p is.
- Length normalisation (§5.4). The step follows
      E_y[c(y)·∇ℓ̄_θ(y)] = ∇_θ E_y[c(y)/|y|]   (c fixed),
  not ∇C = ∇E_y[c(y)]: it is the step of a per-token constraint. Ĉ estimates E[c], so
  λ̂ weights the constraints by C; but a step can lower E[c/|y|] without lowering C
  (a 1{|y| > 16} cost falls per token as violating answers grow longer), so that C_i
  reaches ≤ 0 is observed on the runs (docs/real_models.md), not proven.
  --score=sum weights c by Σ_t log π instead, whose expected step is ∇C (sequence_score).
  On SmolLM2 a lower bound on ended_length, which an answer cut at the cap violates,
  needed it: under ℓ̄ the cut answers, the longest violators, grew to over half of a
  constraint step's rollouts.
- REINFORCE without a baseline (Eq. 12 as written) by default; --baseline=loo adds a
  leave-one-out baseline scaled by length (by 1 with --score=sum), which keeps Eq. 12's
  expected step (loo_baseline). Ĉ takes in the current batch before it weights that batch's
  gradient (§5.4).
- MM baseline: on each constraint step, with the fresh Ĉ (L3M's estimate),
      λ_i ← max(0, λ_i + η_λ·Ĉ_i),
  then a step on Σ_i λ_i·surrogate_i. No 1/k: the learned λ_i are the Lagrangian's
  own (Eq. 8); L3M's 1/k is inside λ̂.
"""
import math

import torch
import torch.nn.functional as F


def barrier(z, mu, s):
    """Relaxed log barrier B_{µ,s}(z) (Eq. 9), elementwise on a tensor z; µ, s > 0
    (the paper takes s = µ², barrier_s).

        B(z) = −µ·log(−z)                 z ≤ −s
             = (µ/s)·z + µ − µ·log(s)     z > −s

    Each branch is chosen by torch.where, so autograd gives each branch's own
    derivative, µ/s at z = −s from both sides, whatever convention a torch version
    keeps for clamp or relu at their kinks. The log's argument is −z only where that
    branch is taken (elsewhere s), so the branch not taken has no NaN to leak into
    the gradient.
    """
    log_branch = z <= -s
    log_part = -mu * torch.log(torch.where(log_branch, -z, s))
    linear_part = (mu / s) * z + mu - mu * math.log(s)
    return torch.where(log_branch, log_part, linear_part)


def barrier_grad(z, mu, s):
    """B'_{µ,s}(z) (Eq. 9): continuous, and non-decreasing (B is convex).

        B'(z) = µ / max(−z, s)
    """
    return mu / torch.clamp(-z, min=s)


def barrier_s(mu):
    """s = µ², the paper's relaxation point (§5.2): the constraint step uses B_{µ,µ²}."""
    return mu**2


def mu_at(step, total_steps, mu_0=1.0, mu_T=1e-6):
    """µ at step t of T = total_steps (§5.1: one stochastic step per µ, decayed
    exponentially):

        µ_t = µ_0·(µ_T/µ_0)^(t/T)

    Exact at both ends: t = 0 gives µ_0 (x**0.0 == 1.0), and t = T returns µ_T itself.
    """
    if not 0 <= step <= total_steps:
        raise ValueError(f"step {step} outside the schedule [0, {total_steps}]")
    if step == total_steps:
        return mu_T
    return mu_0 * (mu_T / mu_0) ** (step / total_steps)


def mu_decay(total_steps, mu_0=1.0, mu_T=1e-6):
    """The factor by which mu_at's schedule multiplies µ at each step, T = total_steps:

        µ_{t+1}/µ_t = (µ_T/µ_0)^(1/T)

    Below 1 for µ_T < µ_0. The paper takes one stochastic step per µ (§5.1); train.py
    warns when 1/mu_decay is large, i.e. when µ falls too fast (a short run).
    """
    return (mu_T / mu_0) ** (1 / total_steps)


class ConstraintEMA:
    """Ĉ_i, the exponential moving average of the batch means of c_i = b_i − r_i (§5.4).
    C_i enters λ̂ without a gradient, so earlier batches may reduce its variance; θ
    moves, so they are forgotten at rate α:

        Ĉ ← mean_batch(c)                      on the first batch
        Ĉ ← (1 − α)·Ĉ + α·mean_batch(c)        afterwards
    """

    def __init__(self, k, alpha=0.1):
        self.k, self.alpha = k, alpha
        self.value = None  # (k,) float64 Ĉ, once a batch has been seen
        self.batch_mean = None  # (k,) float64, the last global batch mean of c

    def update(self, c, all_reduce=None):
        """Fold in one batch of per-sample c (B, k); returns Ĉ (k,), or None if the
        batch has a non-finite c. all_reduce: an optional in-place sum over ranks. It
        sums [Σ_b c_b, B] (k+1,): the mean is the global batch's even when ranks hold
        different numbers of samples (or none), and every rank gets the same Ĉ."""
        B, k = c.shape
        if k != self.k:
            raise ValueError(f"expected {self.k} constraints, got c of shape {tuple(c.shape)}")

        c = c.detach().double()
        stats = torch.cat([c.sum(0), c.new_tensor([B])])  # (k+1,)
        if all_reduce is not None:
            all_reduce(stats)
        # A non-finite cost on any rank makes every rank's sums non-finite: Ĉ stays as
        # it was, and every rank can skip the step alike.
        if not torch.isfinite(stats).all():
            return None
        if stats[k] == 0:
            raise ValueError("no samples in the (global) batch: Ĉ cannot be updated")

        mean = stats[:k] / stats[k]  # (k,)
        self.batch_mean = mean
        if self.value is None:
            self.value = mean
        else:
            self.value = (1 - self.alpha) * self.value.to(mean) + self.alpha * mean
        return self.value


def lambda_hat(C_hat, mu, k):
    """λ̂_i = B'_{µ,µ²}(Ĉ_i)/k (§5.2), float32 and detached:

        λ̂_i = µ / (k·max(−Ĉ_i, µ²))

    With λ̂ for λ, the barrier's gradient (Eq. 10–11) is the Lagrangian's (Eq. 8):

        ∇G_µ = ∇L + (1/k) Σ_i B'(C_i)·∇C_i = ∇L + Σ_i λ̂_i·∇C_i

    Active (Ĉ_i ≥ −µ²): λ̂_i = 1/(kµ), up to 10⁶/k at µ = 1e-6 (clipping tames it).
    Inactive (Ĉ_i < 0 fixed): λ̂_i = µ/(k·(−Ĉ_i)) → 0 as µ → 0, complementary
    slackness by design.
    """
    return barrier_grad(C_hat.detach().double(), mu, barrier_s(mu)).div(k).float()


def barrier_branch(C_hat, mu) -> list:
    """The branch of B_{µ,µ²} (Eq. 9) that each Ĉ_i of C_hat (k,) sits on (§5.2):

        "log"      Ĉ_i ≤ −µ²    the inactive side, λ̂_i = µ/(k·(−Ĉ_i))
        "linear"   Ĉ_i > −µ²    active, λ̂_i = 1/(kµ)
    """
    branches = []
    for C in C_hat.tolist():
        if C <= -barrier_s(mu):
            branches.append("log")
        else:
            branches.append("linear")
    return branches


def chance(reward, b, eps):
    """P[r ≥ b] ≥ 1 − ε (§4.1) as the average constraint E[1{r ≥ b}] ≥ 1 − ε: from a
    reward function r, returns (the reward function 1{r ≥ b}, its threshold 1 − ε)."""
    return (lambda *args: (reward(*args) >= b).float()), 1.0 - eps


def _to_list(t):
    """A tensor as Python numbers; None stays None."""
    if t is None:
        return None
    return t.tolist()


def _to_float64(x):
    """Python numbers as a float64 tensor; None stays None."""
    if x is None:
        return None
    return torch.tensor(x, dtype=torch.float64)


class Multipliers:
    """The multipliers of k constraints: L3M's λ̂ from the barrier (method "l3m", §5.2)
    or the MM baseline's λ by projected gradient ascent ("mm", step size eta_lam, to
    which MM is very sensitive; λ starts at 0). alpha: the EMA factor of Ĉ. Both methods
    follow train.py's coin: heads a task step on L, tails a constraint step."""

    def __init__(self, k, method="l3m", eta_lam=None, alpha=0.1):
        if method not in ("l3m", "mm"):
            raise ValueError(f"method must be 'l3m' or 'mm', not {method!r}")
        if (method == "mm") != (eta_lam is not None):
            raise ValueError("eta_lam is required for method='mm' and meaningless for 'l3m'")

        self.k, self.method, self.eta_lam = k, method, eta_lam
        self.ema = ConstraintEMA(k, alpha)
        self.lam_mm = None  # (k,) float64, MM's λ
        if method == "mm":
            self.lam_mm = torch.zeros(k, dtype=torch.float64)

    def observe(self, c, all_reduce=None):
        """Update Ĉ with a batch c (B, k), then MM's λ; None (no update) if c is not
        finite.

            λ ← max(0, λ + η_λ·Ĉ)
        """
        C_hat = self.ema.update(c, all_reduce)
        if self.method == "mm" and C_hat is not None:
            ascent = self.lam_mm.to(C_hat) + self.eta_lam * C_hat
            self.lam_mm = torch.clamp(ascent, min=0.0)
        return C_hat

    def lam(self, mu):
        """The multipliers (k,) float32 that weight the constraint step at barrier
        parameter µ."""
        if self.ema.value is None:
            raise RuntimeError("observe a constraint batch before asking for multipliers")
        if self.method == "mm":
            return self.lam_mm.float()
        return lambda_hat(self.ema.value, mu, self.k)

    def state_dict(self):
        """Plain Python numbers: their checkpoint loads with weights_only=True."""
        return {"k": self.k, "method": self.method, "eta_lam": self.eta_lam,
                "alpha": self.ema.alpha, "C_hat": _to_list(self.ema.value),
                "lam": _to_list(self.lam_mm)}

    def load_state_dict(self, state):
        # Checkpoints written before Ĉ moved here hold it under "ema".
        state = {**state, **state.get("ema", {})}
        if (state["k"], state["method"]) != (self.k, self.method):
            raise ValueError(f"checkpoint is for k={state['k']}, {state['method']}; "
                             f"this run is k={self.k}, {self.method}")

        self.eta_lam = state["eta_lam"]
        self.ema.alpha = state["alpha"]
        self.ema.value = _to_float64(state["C_hat"])
        self.lam_mm = _to_float64(state["lam"])


def logp_norm(logits, tokens, mask, temperature=1.0, segments=None):
    """The length-normalised log-likelihood of each response, float32 (float64 for
    float64 logits), differentiable in logits:

        ℓ̄_θ(y|x) = (1/|y|)·Σ_t log π_θ(y_t | x, y_<t)

    logits (B, T, V) = model(tokens); logits[:, t] scores tokens[:, t+1].
    tokens (B, T): prompt + response (+ padding).
    mask (B, T) bool: True at the scored tokens, the response with the EOS that ended
    it (stopping is what a length constraint must learn), never prompt or padding;
    False at each sequence's first token (nothing scores it).
    segments (B, T): for packed rows (data.packed_batch), the id 0..S-1 of the
    sequence each token is in; one ℓ̄ per sequence, (S,). Default: a sequence per
    row, (B,).
    The log-probs are those of softmax(logits / temperature), as sampled.
    """
    B, T = tokens.shape
    S = B
    if segments is None:
        segments = torch.arange(B, device=tokens.device)[:, None].expand(B, T)
    else:
        S = int(segments.max()) + 1
    starts = F.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True)
    if (mask & starts).any():
        raise ValueError("mask must be False at each sequence's first token: no logits "
                         "score it")
    # Shifted by one, position t holds the token that logits[:, t] scores; a scored
    # token is never a sequence's first, so position t is in its sequence. The last
    # position scores nothing (token 0, unscored): the logits are used whole, as a
    # slice of them would cost a (B, T, V) copy in backward.
    targets = F.pad(tokens[:, 1:], (0, 1))  # (B, T)
    scored = F.pad(mask[:, 1:], (0, 1))  # (B, T)
    tok_logp = TokenLogProb.apply(logits, targets, temperature)  # (B, T)
    ids = segments.flatten()
    total = tok_logp.new_zeros(S).index_add(0, ids, torch.where(scored, tok_logp, 0.0).flatten())
    n = torch.zeros(S, dtype=torch.long, device=ids.device).index_add(0, ids, scored.flatten().long())
    if (n == 0).any():  # |y|, EOS included
        empty = torch.nonzero(n == 0).flatten().tolist()
        raise ValueError(f"sequences {empty} have an empty response mask")
    return total / n


class TokenLogProb(torch.autograd.Function):
    """log softmax(z / temperature)[y] at every position: (B, T) from logits z (B, T, V)
    and targets y (B, T), in float32 (float64 stays), in chunks of positions.

    Autograd would keep float32 copies of (B, T, V) for each op (the cast, the
    division, the log-sum-exp, the gather's gradient): ~4 GB at once for the 7B
    command's batch. Here the only (B, T, V) tensor made is the gradient itself, in
    the logits' dtype; backward recomputes the softmax a chunk at a time:

        ∂/∂z_v log softmax(z/τ)[y] = (1[v = y] − softmax(z/τ)_v) / τ"""

    chunk = 2**24  # elements of (B, t, V) per chunk: 64 MB of float32 temporaries

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(targets.shape, dtype=dtype, device=logits.device)  # (B, T)
        for s, z, y in TokenLogProb.chunks(logits, targets):  # positions s: (B, t, V), (B, t)
            z = TokenLogProb.scaled(z, temperature)
            out[:, s] = z.gather(-1, y[..., None]).squeeze(-1) - torch.logsumexp(z, -1)
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (B, T)
        logits, targets = ctx.saved_tensors
        t = ctx.temperature
        grad_logits = torch.empty_like(logits)
        for s, z, y in TokenLogProb.chunks(logits, targets):
            g = grad[:, s, None]  # (B, t, 1)
            z = TokenLogProb.scaled(z, t)
            dz = torch.softmax(z, -1).mul_(-g)  # −g·softmax
            dz.scatter_add_(-1, y[..., None], g)  # + g at the target
            if t != 1.0:
                dz /= t
            grad_logits[:, s] = dz
        return grad_logits, None, None

    @staticmethod
    def chunks(logits, targets):
        """(positions, their logits, their targets), a chunk at a time."""
        B, T, V = logits.shape
        step = max(1, TokenLogProb.chunk // (B * V))
        for start in range(0, T, step):
            s = slice(start, start + step)
            yield s, logits[:, s], targets[:, s]

    @staticmethod
    def scaled(z, temperature):
        """z / temperature in float32 (float64 stays), a copy of one chunk."""
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if temperature != 1.0:
            z = z / temperature
        return z


def task_loss(logp):
    """L on a task batch: the mean over sequences of l_θ = −ℓ̄_θ(y|x) (the paper's
    "perplexity"). Per sequence, not per token: each of n tokens weighs 1/n, so the
    task alone favours stopping early (on lengths alone it converges to
    q(n) ∝ p_data(n)/n, whose mean is the harmonic mean of the data's lengths)."""
    return -logp.mean()


def loo_baseline(c, n):
    """c (B, k) less a leave-one-out baseline scaled by length (--baseline=loo), over a
    batch of B ≥ 2 responses with n (B,) = |y|, the counts ℓ̄ is normalised by:

        c'_b = c_b − |y_b|·β_b,   β_b = Σ_{j≠b} c_j / Σ_{j≠b} |y_j|

    The step's expected gradient stays Eq. 12's with ℓ̄, E[c·∇ℓ̄] (not ∇C: sequence_score):
    β_b does not depend on y_b, and E[|y|·∇ℓ̄] = E[∇log π] = 0, where y is drawn from π_θ
    itself (top_p = 1, top_k = 0; top-p shares the header's bias). The others are other
    prompts' answers, one per prompt, not samples of the same prompt as in RLOO and GRPO.
    Their plain leave-one-out baseline, c_b − mean_{j≠b} c_j, does not keep it:
    E[∇ℓ̄] = ∇E[1/|y|] ≠ 0, so it adds −C·∇E[1/|y|], which the surrogate's descent turns
    into a push toward shorter answers while C > 0 and longer ones while C < 0, whatever
    the constraint: the wrong way for a violated lower bound on length
    (test_loo_baseline_keeps_eq12_*)."""
    n = n.to(c.dtype)
    beta = (c.sum(0) - c) / (n.sum() - n)[:, None]  # (B, k): the others' cost per token
    return c - n[:, None] * beta


def sequence_score(logp, n, score="mean"):
    """What the constraint step's surrogate weights by c, (B,) from ℓ̄ (B,) and n (B,) =
    |y| with the EOS: ℓ̄ itself ("mean", §5.4, the default), or

        |y|·ℓ̄ = Σ_t log π_θ(y_t | x, y_<t)          ("sum", --score=sum)

    whose expected step E[c·∇log π] is ∇C itself (Eq. 12 exactly). The mean's is
    ∇E[c/|y|] (the header), which an indicator cost such as 1{|y| > 16} also lowers by
    making the answers that violate it longer."""
    if score == "mean":
        return logp
    return logp * n.to(logp)


def reinforce_surrogate(logp, c, lam):
    """The loss of a constraint step. logp (B,): ℓ̄_θ of the sampled responses;
    c (B, k) = b − r and lam (k,) are constants.

        surrogate = Σ_i λ_i · mean_b(c_bi · ℓ̄_θ(y_b))
        ∇surrogate = Σ_i λ_i · mean_b(c_bi · ∇ℓ̄_θ(y_b))

    By the log-derivative trick (Eq. 12), mean_b(c_bi·∇log π_θ(y_b)) estimates ∇C_i:
    the step is along −Σ_i λ_i ∇C_i, the constraint part of Eq. 11 (∇ℓ̄ for ∇log π,
    §5.4). C_i is to decrease and the surrogate is minimised: hence c = b − r, not
    r − b. Under data parallelism the gradient average over ranks makes the mean
    global (exactly, with B rows per rank).
    """
    per_constraint = (c.detach().to(logp.dtype) * logp[:, None]).mean(0)  # (k,)
    return (lam.detach().to(per_constraint) * per_constraint).sum()
