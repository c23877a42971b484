"""Rewards r_i(y|x) and constraints (r_i, b_i) for L3M fine-tuning, written C_i = E[b_i − r_i] ≤ 0.

    rewards = {"length": length_reward, "helpful": LearnedReward(model.load_model("out/rm_helpful/best")[0])}
    constraints = parse_constraints(["length>=50", "length<=100", "P[helpful>=3]>=0.9"], rewards)
    samples = Samples.from_generate(prompts, responses, ended, tokenizer)
    c = torch.stack([con.cost(samples) for con in constraints], 1)   # (B, k), c_i = b_i − r_i

Constraints on the command line (one --constraint each):
    NAME>=NUMBER              average constraint E[r] ≥ NUMBER: reward r, b = NUMBER
    NAME<=NUMBER              E[r] ≤ NUMBER, i.e. reward −r, b = −NUMBER
    P[NAME>=NUMBER]>=PROB     chance constraint (§4.1): reward 1{r ≥ NUMBER}, b = PROB
    P[NAME<=NUMBER]>=PROB     reward 1{r ≤ NUMBER}, b = PROB
NAME: "length", or a learned reward model's name. No strict < or >: on an average they would mean ≤ and ≥.

Where this departs from the paper, or fixes what it leaves open:
- Length (§6.2) is |y|, the number of response tokens *excluding* the EOS (a response cut at max_new_tokens has
  none). "length>=l_low" gives r = |y|, b = l_low where §6.2 writes r₁ = |y| − l_low, b₁ = 0: the same c = l_low − |y|.
- Learned rewards (App. A.1) are the reward model's ℓ̄_φ(y|x) *including* the EOS of an ended response, as in its
  Bradley–Terry training on full responses. Every reward returns float32 (B,) on the CPU.
"""
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

import data
import l3m

@dataclass
class Samples:
    """A batch of prompts x and sampled responses y, as token ids and as text."""
    prompts: list  # B lists of prompt ids (BOS first)
    responses: list  # B lists of sampled ids, with the EOS when the response ended (model.generate)
    ended: list  # B bools: the response ended with EOS
    prompt_texts: list  # B str
    response_texts: list  # B str, without the EOS

    @classmethod
    def from_generate(cls, prompts, responses, ended, tokenizer):
        """From model.generate's (responses, ended) for these prompts."""
        return cls([list(p) for p in prompts], [list(r) for r in responses], list(ended),
                   [tokenizer.decode(p) for p in prompts],
                   [tokenizer.decode(r[:len(r) - e]) for r, e in zip(responses, ended)])

RewardFn = Callable[[Samples], torch.Tensor]  # Samples -> float32 (B,)

@dataclass(frozen=True)
class Constraint:
    """E[r(y|x)] ≥ b, i.e. C = E[b − r] ≤ 0 (Eq. 4–5)."""
    name: str
    reward: RewardFn
    b: float

    def cost(self, samples: Samples) -> torch.Tensor:
        """c = b − r(y|x), float32 (B,); its batch mean estimates C."""
        return self.b - self.reward(samples)

def verdict(C: float, se: float, z: float = 2.0) -> str:
    """An estimate C (mean of b − r over n responses) with standard error se: 'satisfied' (C ≤ 0), 'within noise'
    (0 < C ≤ z·se) or 'violated'. At an active constraint's KKT point, C ~ N(0, se²): 'violated' 2 % of the time."""
    return "satisfied" if C <= 0 else "within noise" if C <= z * se else "violated"

def length_reward(samples: Samples) -> torch.Tensor:
    """|y| in tokens, excluding the EOS (§6.2)."""
    return torch.tensor([len(r) - e for r, e in zip(samples.responses, samples.ended)], dtype=torch.float32)

def sequence_reward(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_φ(y|x) = ℓ̄_φ(y|x) (App. A.1), the reward model's own length-normalised log-likelihood, differentiable."""
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    return l3m.logp_norm(model(tokens), tokens, mask)  # (B,)

def preference_rewards(model, examples: Sequence, pad_id: int = 0) -> tuple:
    """(r(y⁺|x), r(y⁻|x)), each (B,), for data.PreferenceExamples, with gradients. y⁺ and y⁻ go through one
    forward as a (2B, T) batch: one collective per step under FSDP."""
    prompts = [e.prompt for e in examples]
    responses = [e.chosen for e in examples] + [e.rejected for e in examples]
    tokens, mask = data.response_batch(prompts + prompts, responses, pad_id)  # (2B, T)
    return sequence_reward(model, tokens, mask).chunk(2)

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of −log σ(r(y⁺|x) − r(y⁻|x)), the negative log-likelihood of the preferences (App. A.1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()

def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked right, r(y⁺|x) > r(y⁻|x); a tie counts as wrong."""
    return (r_chosen > r_rejected).float().mean().item()

class LearnedReward:
    """A Bradley–Terry reward model as a reward: eval mode, no gradients, micro-batches (small (B, T, V) logits)."""

    def __init__(self, model, pad_id: int = 0, micro_batch: int = 16):
        self.model, self.pad_id, self.micro_batch = model.eval().requires_grad_(False), pad_id, micro_batch

    @torch.no_grad()
    def __call__(self, samples: Samples) -> torch.Tensor:
        out = []
        for i in range(0, len(samples.prompts), self.micro_batch):
            j = slice(i, i + self.micro_batch)
            tokens, mask = data.response_batch(samples.prompts[j], samples.responses[j], self.pad_id)
            out.append(sequence_reward(self.model, tokens, mask).float().cpu())
        return torch.cat(out)  # (B,)

SYNTAX = "NAME>=NUMBER, NAME<=NUMBER, P[NAME>=NUMBER]>=PROB or P[NAME<=NUMBER]>=PROB"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOUND = re.compile(rf"\s*(\w+)\s*(>=|<=)\s*({_NUMBER})\s*")
_CHANCE = re.compile(rf"\s*P\[(.*)\]\s*>=\s*({_NUMBER})\s*")

class ConstraintError(ValueError):
    """A constraint that does not parse; the message says what is accepted."""

def _bound(text: str, inner: str, rewards: Mapping[str, RewardFn]) -> tuple:
    """NAME>=NUMBER or NAME<=NUMBER -> (reward, op, threshold)."""
    m = _BOUND.fullmatch(inner)
    if m is None:
        hint = (" (the threshold must be a finite number)" if re.fullmatch(r"\s*\w+\s*(>=|<=)\s*\S+\s*", inner)
                else " (use >= or <=, not > or < or =)" if re.search(r"[<>=]", inner) else "")
        raise ConstraintError(f"{text!r}: cannot read {inner.strip()!r}{hint}; expected {SYNTAX}")
    name, op, number = m.groups()
    if name not in rewards:
        raise ConstraintError(f"{text!r}: unknown reward {name!r}; known rewards: {', '.join(sorted(rewards))}")
    return rewards[name], op, float(number)

def parse_constraint(text: str, rewards: Mapping[str, RewardFn]) -> Constraint:
    """One constraint from the syntax in the module docstring; a ConstraintError says what is wrong."""
    chance = _CHANCE.fullmatch(text)
    if chance is not None:
        reward, op, t = _bound(text, chance.group(1), rewards)
        q = float(chance.group(2))
        if not 0.0 < q <= 1.0:
            raise ConstraintError(f"{text!r}: a probability must lie in (0, 1], not {q}")
        # P[r ≥ t] ≥ 1 − ε is the average constraint E[1{r ≥ t}] ≥ 1 − ε (§4.1), 1 − ε = q; P[r ≤ t] = P[−r ≥ −t]
        sign = 1.0 if op == ">=" else -1.0
        return Constraint(text.strip(), lambda s: l3m.chance(sign * reward(s), sign * t, 0.0)[0], q)
    if text.lstrip().startswith("P["):
        raise ConstraintError(f"{text!r}: a chance constraint reads P[NAME>=NUMBER]>=PROB; expected {SYNTAX}")
    reward, op, t = _bound(text, text, rewards)
    return Constraint(text.strip(), reward, t) if op == ">=" else Constraint(text.strip(), lambda s: -reward(s), -t)

def parse_constraints(texts: Sequence[str], rewards: Mapping[str, RewardFn]) -> list:
    """Every --constraint, in order; names must be unique."""
    constraints = [parse_constraint(t, rewards) for t in texts]
    if len({c.name for c in constraints}) != len(constraints):
        raise ConstraintError(f"a constraint is given twice: {[c.name for c in constraints]}")
    return constraints
