"""The paper's Fig. 1–3 at toy scale, on the demo data and the demo base model (train.py --init=demo).

    python reproduce.py --quick     # about 10 minutes on a 2-core CPU
    python reproduce.py             # the full grids, about an hour

Every run is a `python train.py ...` subprocess (two at a time, one thread each) whose report.json is
read back. Results go to --out (default out/reproduce): results.json, results.md and, when matplotlib
is installed, fig1.png (the barrier family), fig2.png (length distributions against their bands) and
fig3.png (the two learned rewards reached by L3M and MM).

Toy-scale choices: the demo base's responses are ~40 tokens where LLaMA-7B SFT's are ~120, so the
paper's length bands are divided by 3 (e.g. [50, 100] -> [16, 32]). The two reward models
("informative" and "cautious", the analogues of helpful and harmless) are Bradley–Terry models
initialised from the demo base; their rewards are length-normalised log-likelihoods, so the grid of
thresholds is placed around the rewards of the SFT model instead of the paper's 0–4.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import l3m

HERE = os.path.dirname(os.path.abspath(__file__))
FULL_BANDS = [(16, 32), (32, 48), (16, 24), (24, 32), (32, 40), (40, 48), (24, 28), (28, 32), (32, 36), (36, 40)]
QUICK_BANDS = [(16, 24), (24, 32)]
# (informative, cautious) thresholds as offsets from the SFT model's mean rewards, in nats of ℓ̄, along the
# trade-off the paper's grid walks: raise one, the other, or both a little.
FULL_GRID = [(1.0, -0.5), (1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (-0.5, 1.0)]
QUICK_GRID = [(1.0, 0.0)]


def train(out: str, *flags, data_dir: str) -> dict:
    """Run train.py once (skipped when its report exists) and return its report."""
    report = os.path.join(out, "report.json")
    if not os.path.isfile(report):
        cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--data_dir={data_dir}", f"--out_dir={out}", *flags]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    with open(report) as f:
        return json.load(f)


def fig1(out: str) -> str:
    """B_{µ,µ²}(z) for µ from 1 to 0.01 (paper Fig. 1): → 0 for z ≤ 0 and → ∞ for z > 0."""
    mus = [1.0, 0.3, 0.1, 0.03, 0.01]
    zs = [-1.0, -0.5, -0.1, -0.01, 0.0, 0.01, 0.1, 0.2]
    table = ["| µ | " + " | ".join(f"z = {z:g}" for z in zs) + " |", "|---" * (len(zs) + 1) + "|"]
    for mu in mus:
        b = l3m.barrier(torch.tensor(zs, dtype=torch.float64), mu, mu ** 2)
        table.append(f"| {mu:g} | " + " | ".join(f"{v:.3g}" for v in b.tolist()) + " |")
    plt = pyplot()
    if plt:
        z = torch.linspace(-1, 0.2, 600, dtype=torch.float64)
        for mu in mus:
            plt.plot(z, l3m.barrier(z, mu, mu ** 2), label=f"µ = {mu:g}")
        plt.ylim(-0.5, 3)
        plt.xlabel("z")
        plt.ylabel(r"$B_{\mu,\mu^2}(z)$")
        plt.legend()
        plt.title("Relaxed log barrier (Fig. 1)")
        plt.savefig(os.path.join(out, "fig1.png"), dpi=120)
        plt.close()
    return "\n".join(table)


def fig2(out: str, bands, steps: int, data_dir: str, common: list) -> tuple:
    """SFT and length-constrained L3Ms (paper Fig. 2): mean length and task perplexity on the test split."""
    jobs = {"SFT": ["--method=sft", f"--steps={steps}"]}
    for lo, hi in bands:
        jobs[f"L3M [{lo}, {hi}]"] = ["--method=l3m", f"--steps={steps}", f"--constraint=length>={lo}",
                                    f"--constraint=length<={hi}"]
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(train, os.path.join(out, "fig2", name.replace(" ", "").replace(",", "-")),
                                     *flags, *common, data_dir=data_dir) for name, flags in jobs.items()}
        reports = {name: f.result() for name, f in futures.items()}
    rows = [("base (demo pretraining)", None, reports["SFT"]["before"])]
    rows += [(name, None if name == "SFT" else bands[i - 1], r["after"]) for i, (name, r) in enumerate(reports.items())]
    table = ["| model | mean length | quartiles | task perplexity | inside the band |", "|---|---|---|---|---|"]
    results = []
    for name, band, r in rows:
        inside = "" if band is None else ("✓" if band[0] <= r["length_mean"] <= band[1] else "✗")
        table.append(f"| {name} | {r['length_mean']:.1f} | {r['length_q1']:.0f} / {r['length_median']:.0f} / "
                     f"{r['length_q3']:.0f} | {r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f} | {inside} |")
        results.append({"model": name, "band": band, **{k: r[k] for k in (
            "length_mean", "length_p10", "length_q1", "length_median", "length_q3", "length_p90",
            "perplexity_mean", "perplexity_std")}})
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(1.2 * len(results) + 2, 4.5))
        stats = [{"label": r["model"].replace("L3M ", ""), "med": r["length_median"], "q1": r["length_q1"],
                  "q3": r["length_q3"], "whislo": r["length_p10"], "whishi": r["length_p90"],
                  "mean": r["length_mean"]} for r in results]
        ax.bxp(stats, showfliers=False, showmeans=True)
        for i, r in enumerate(results, start=1):
            if r["band"]:
                ax.plot([i - 0.4, i + 0.4], [r["band"][0]] * 2, "r-", [i - 0.4, i + 0.4], [r["band"][1]] * 2, "r-")
        ax.set_ylabel("response length (tokens)")
        ax.set_title("Length-constrained L3Ms (Fig. 2, toy scale): box quartiles, whiskers p10–p90, ▲ mean, "
                     "red the band")
        plt.xticks(rotation=30, ha="right")
        plt.tight_layout()
        plt.savefig(os.path.join(out, "fig2.png"), dpi=120)
        plt.close()
    return "\n".join(table), results


def fig3(out: str, grid, steps: int, rm_steps: int, data_dir: str, common: list) -> tuple:
    """Two learned rewards, a grid of (r₁ ≥ a, r₂ ≥ b) constraints, L3M vs MM (paper Fig. 3)."""
    with ThreadPoolExecutor(2) as pool:
        rms = {name: pool.submit(train, os.path.join(out, "fig3", f"rm_{name}"), "--method=reward",
                                 f"--demo_reward={name}", f"--steps={rm_steps}", "--eval_every=20", "--lr=1e-3",
                                 data_dir=data_dir) for name in ("informative", "cautious")}
        accuracy = {name: f.result()["test_accuracy"] for name, f in rms.items()}
    rm_flags = [f"--reward_model={n}={os.path.join(out, 'fig3', f'rm_{n}', 'best')}" for n in accuracy]
    # thresholds so low that they only make the report carry the SFT model's mean rewards
    sft = train(os.path.join(out, "fig3", "sft"), "--method=sft", f"--steps={steps}", *rm_flags,
                "--constraint=informative>=-100", "--constraint=cautious>=-100", *common, data_dir=data_dir)
    m1 = sft["after"]["constraints"]["informative>=-100"]["reward_mean"]
    m2 = sft["after"]["constraints"]["cautious>=-100"]["reward_mean"]
    jobs = {}
    for da, db in grid:
        a, b = round(m1 + da, 2), round(m2 + db, 2)
        for method in ("l3m", "mm"):
            jobs[(a, b, method)] = [f"--method={method}", f"--steps={steps}", *rm_flags,
                                    f"--constraint=informative>={a}", f"--constraint=cautious>={b}"]
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(train, os.path.join(out, "fig3", f"{key[2]}_{key[0]}_{key[1]}"), *flags, *common,
                                    data_dir=data_dir) for key, flags in jobs.items()}
        reports = {key: f.result() for key, f in futures.items()}
    table = [f"Reward models' held-out pairwise accuracy: informative {accuracy['informative']:.3f}, "
             f"cautious {accuracy['cautious']:.3f}. SFT: informative {m1:.2f}, cautious {m2:.2f}, "
             f"perplexity {sft['after']['perplexity_mean']:.3f} ± {sft['after']['perplexity_std']:.3f}.", "",
             "| constraint (informative ≥ a, cautious ≥ b) | method | informative | cautious | satisfied | "
             "task perplexity |", "|---|---|---|---|---|---|"]
    results = []
    for (a, b, method), r in reports.items():
        cons = list(r["after"]["constraints"].values())
        ok = all(c["satisfied"] for c in cons)
        table.append(f"| ({a:.2f}, {b:.2f}) | {method.upper()} | {cons[0]['reward_mean']:.2f} | "
                     f"{cons[1]['reward_mean']:.2f} | {'✓' if ok else '✗'} | "
                     f"{r['after']['perplexity_mean']:.3f} ± {r['after']['perplexity_std']:.3f} |")
        results.append({"a": a, "b": b, "method": method, "informative": cons[0]["reward_mean"],
                        "cautious": cons[1]["reward_mean"], "satisfied": ok,
                        "perplexity_mean": r["after"]["perplexity_mean"], "perplexity_std": r["after"]["perplexity_std"]})
    plt = pyplot()
    if plt:
        fig, ax = plt.subplots(figsize=(6, 5))
        for r in results:
            color = "C0" if r["method"] == "l3m" else "C1"
            ax.plot([r["a"], r["informative"]], [r["b"], r["cautious"]], color=color, lw=0.8)
            ax.scatter(r["informative"], r["cautious"], color=color, marker="o" if r["satisfied"] else "x")
            ax.scatter(r["a"], r["b"], color="k", marker="+")
        ax.scatter(m1, m2, color="k", marker="s", label="SFT")
        ax.plot([], [], "C0o", label="L3M")
        ax.plot([], [], "C1o", label="MM")
        ax.set_xlabel("informative reward")
        ax.set_ylabel("cautious reward")
        ax.legend()
        ax.set_title("Fig. 3 toy: rewards reached (● both met, × not), + the thresholds")
        plt.tight_layout()
        plt.savefig(os.path.join(out, "fig3.png"), dpi=120)
        plt.close()
    return "\n".join(table), {"reward_model_accuracy": accuracy, "sft": {"informative": m1, "cautious": m2},
                              "runs": results}


# -----------------------------------------------------------------------------
# Fig. 3 feasibility: which (informative, cautious) mean rewards can any policy reach on the test prompts?
#
# The demo answers are written by code (data.demo_answer), so the responses a policy could give to a test
# prompt are known. For each prompt, sample many generator answers about its subject, score them with both
# reward models, and take the set of mean-reward pairs a policy choosing among them per prompt reaches: the
# Minkowski average of the per-prompt convex hulls. Its upper-right (Pareto) frontier comes from
# scalarisation: for w in [0, 1] every prompt picks its candidate maximising w·r₁ + (1 − w)·r₂, and the
# frontier point is the mean of the picks. The frontier is an upper bound for a policy that writes only
# what the generator writes (the reward models were trained on nothing else).


def demo_subject(prompt_text: str) -> str:
    """The name (a key of data._ANIMALS or data._THINGS) the prompt's last question asks about."""
    import data
    last = prompt_text.rsplit("Human:", 1)[-1]
    names = [n for n in list(data._ANIMALS) + list(data._THINGS) if f"the {n}" in last]
    if len(names) != 1:
        raise ValueError(f"cannot tell the subject of {last!r}")
    return names[0]


def demo_sentence_check(response: str, name: str) -> tuple:
    """(sentences, unknown, off_subject) of a sampled response to a question about name: how many sentences it
    has, how many of them the demo generator never writes (garbled), and how many it writes only about another
    subject (a fact or caution naming the wrong animal or thing)."""
    import re
    import data
    own = {t for ts in data._sentences(name).values() for t in ts}
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", response.strip()) if s]
    known = data._sentence_kinds()
    unknown = sum(s not in known for s in sentences)
    return len(sentences), unknown, sum(s in known and s not in own for s in sentences)


def demo_candidates(rng, name: str, n: int, style: str = "any") -> list:
    """Up to n distinct demo answers about name (data.demo_answer). style "train": caution and filler shares
    drawn as the reward models' preference data draws them (data._style); "any": any shares in [0, 1], half
    of them pinned at 0 or 1, so that answers of only facts, only cautions or only fillers are frequent."""
    import data
    out, tries = {}, 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        n_body = rng.randint(1, data.MAX_BODY)
        if style == "train":
            caution, filler = data._style(rng)
        else:
            caution = rng.choice([0.0, 1.0, rng.random(), rng.random()])
            filler = rng.choice([0.0, 1.0, rng.random(), rng.random()])
        out.setdefault(data.demo_answer(rng, name, n_body, caution, filler), None)
    return list(out)


def score_responses(reward_models: list, prompt_ids, responses: list, eos_id: int, micro_batch: int = 64) -> np.ndarray:
    """(n, k) rewards r_i(y|x) = ℓ̄_φᵢ(y|x) (EOS included, as rewards.LearnedReward scores a finished
    sample) of n responses (lists of ids ending with EOS) to one prompt, under each reward model."""
    import rewards
    prompt_ids = list(prompt_ids)
    order = np.argsort([len(r) for r in responses], kind="stable")  # micro-batches of similar lengths pad little
    ordered = [list(responses[i]) for i in order]
    samples = rewards.Samples([prompt_ids] * len(ordered), ordered, [r[-1] == eos_id for r in ordered],
                              [""] * len(ordered), [""] * len(ordered))
    cols = []
    for rm in reward_models:
        scorer = rewards.LearnedReward(rm, pad_id=eos_id, micro_batch=micro_batch)
        cols.append(scorer(samples).double().numpy())
    out = np.empty((len(responses), len(reward_models)))
    out[order] = np.stack(cols, 1)
    return out


def pareto_frontier(scores: list, n_weights: int = 201) -> np.ndarray:
    """The upper-right frontier of the mean rewards reachable by choosing one candidate per prompt.

    scores: one (n_p, 2) array of (r₁, r₂) per prompt. For each w in linspace(0, 1), every prompt takes the
    candidate maximising w·r₁ + (1 − w)·r₂ (ties: the larger r₁ + r₂); the point is the mean over prompts.
    Returns the distinct points (m, 2), sorted by r₁ ascending (so r₂ descending): the vertices of the
    frontier of the Minkowski average of the per-prompt convex hulls."""
    points = []
    for w in np.linspace(0.0, 1.0, n_weights):
        picks = []
        for s in scores:
            v = w * s[:, 0] + (1 - w) * s[:, 1]
            best = np.flatnonzero(v >= v.max() - 1e-12)
            picks.append(s[best[np.argmax(s[best].sum(1))]])
        points.append(np.mean(picks, 0))
    points = np.unique(np.round(np.array(points), 12), axis=0)
    points = points[np.argsort(points[:, 0], kind="stable")]
    keep = [p for p in points if not any((q >= p).all() and (q > p).any() for q in points)]  # Pareto only
    return np.array(keep)


def frontier_margin(frontier: np.ndarray, a: float, b: float) -> float:
    """max over the reachable set of min(r₁ − a, r₂ − b): the largest δ with (a + δ, b + δ) reachable,
    negative when (a, b) is not. The set is convex, so the maximum lies on the frontier's polyline (vertices
    and the segments between them, on which min of two linear functions peaks at an end or where they cross)."""
    f = np.asarray(frontier, dtype=float)
    best = np.max(np.minimum(f[:, 0] - a, f[:, 1] - b))
    for p, q in zip(f[:-1], f[1:]):
        d = (p[0] - a) - (p[1] - b)  # g(t) = d + t·(dq − d) with dq the same difference at q
        dq = (q[0] - a) - (q[1] - b)
        if d * dq < 0:
            t = d / (d - dq)
            x = p + t * (q - p)
            best = max(best, min(x[0] - a, x[1] - b))
    return float(best)


def feasibility(frontier: np.ndarray, grid) -> list:
    """[(a, b, feasible, margin)] for thresholds (a, b): feasible iff a frontier point has r₁ ≥ a and r₂ ≥ b;
    margin in nats as frontier_margin."""
    out = []
    for a, b in grid:
        m = frontier_margin(frontier, a, b)
        out.append((float(a), float(b), bool(m >= 0), m))
    return out


def demo_test_split(tok, data_dir: str, common: list) -> list:
    """The test split train.py evaluates on with these flags (TaskExamples)."""
    import data
    import train as T
    cfg = T.parse_config([f"--data_dir={data_dir}", *common])
    demo = data.prepare_demo(data_dir, cfg.seed)
    read = data.read_ultrachat([demo.task], tok, max_tokens=cfg.max_len, seed=cfg.seed)
    return data.split_dataset(read.examples, val=cfg.val, test=cfg.test, seed=cfg.seed)[2]


def sample_and_score(policy, tok, test: list, rm_models: list, n: int, seed: int = 0, top_p: float = 0.9,
                     max_new_tokens: int = 128) -> tuple:
    """n responses per test prompt sampled from policy (top-p, temperature 1, as train.py's rollouts), scored by
    the reward models. Returns (per-prompt (n, k) rewards, (prompts · n, 4) array of demo_sentence_check's
    (sentences, unknown, off subject) and whether the response was cut at max_new_tokens)."""
    import model as M
    scores, props = [], []
    for i, ex in enumerate(test):
        name = demo_subject(tok.decode(ex.prompt.tolist()))
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + 1000 * i + j) for j in range(n)]
        responses, ended = M.generate(policy, [ex.prompt.tolist()] * n, max_new_tokens, tok.eos_id, 1.0, top_p, gens)
        scores.append(score_responses(rm_models, ex.prompt, responses, tok.eos_id))
        props += [demo_sentence_check(tok.decode(r), name) + (not e,) for r, e in zip(responses, ended)]
    return scores, np.array(props, dtype=float)


def sample_summary(scores: list, props: np.ndarray) -> dict:
    """Mean and per-sample std of the rewards of sample_and_score, the standard error of a test mean with one
    sample per prompt, and the shares of garbled, off-subject and cut responses."""
    s = np.concatenate(scores)
    std = s.std(0, ddof=1)
    return {"n": len(s), "mean": s.mean(0).tolist(), "std": std.tolist(), "se_100": (std / 10).tolist(),
            "unknown_sentence_share": float(props[:, 1].sum() / max(props[:, 0].sum(), 1)),
            "responses_with_unknown": float(np.mean(props[:, 1] > 0)),
            "off_subject_sentence_share": float(props[:, 2].sum() / max(props[:, 0].sum(), 1)),
            "truncated_share": float(props[:, 3].mean())}


def fig3_feasibility(out: str, data_dir: str, steps: int, rm_steps: int, common: list, n_candidates: int = 200,
                     n_policy: int = 8, seed: int = 0) -> dict:
    """Score generator candidates (and the SFT model's own samples) for every test prompt with both reward
    models; print the frontier and the feasibility of FULL_GRID. Trains the reward models and SFT if missing.
    Writes out/fig3/feasibility.json and the per-prompt scores feasibility_scores.npz."""
    import random
    import model as M
    with ThreadPoolExecutor(2) as pool:
        rms = {name: pool.submit(train, os.path.join(out, "fig3", f"rm_{name}"), "--method=reward",
                                 f"--demo_reward={name}", f"--steps={rm_steps}", "--eval_every=20", "--lr=1e-3",
                                 data_dir=data_dir) for name in ("informative", "cautious")}
        [f.result() for f in rms.values()]
    names = ("informative", "cautious")
    rm_flags = [f"--reward_model={n}={os.path.join(out, 'fig3', f'rm_{n}', 'best')}" for n in names]
    sft = train(os.path.join(out, "fig3", "sft"), "--method=sft", f"--steps={steps}", *rm_flags,
                "--constraint=informative>=-100", "--constraint=cautious>=-100", *common, data_dir=data_dir)
    means = {w: [sft[w]["constraints"][f"{n}>=-100"]["reward_mean"] for n in names] for w in ("before", "after")}
    torch.set_num_threads(1)
    rm_models = [M.load_model(os.path.join(out, "fig3", f"rm_{n}", "best"))[0] for n in names]
    policy, tok = M.load_model(os.path.join(out, "fig3", "sft", "final"))
    test, rng, t0 = demo_test_split(tok, data_dir, common), random.Random(seed), time.time()
    per_prompt = {"any": [], "train": []}
    for ex in test:
        name = demo_subject(tok.decode(ex.prompt.tolist()))
        for style in per_prompt:
            ids = [tok.encode(t, bos=False, eos=True) for t in demo_candidates(rng, name, n_candidates // 2, style)]
            per_prompt[style].append(score_responses(rm_models, ex.prompt, ids, tok.eos_id))
    # the SFT model's own samples (top-p 0.9, as in its test evaluation): what a policy near SFT can say
    per_prompt["policy"], props = sample_and_score(policy, tok, test, rm_models, n_policy, seed)
    per_prompt["any+policy"] = [np.concatenate([a, p]) for a, p in zip(per_prompt["any"], per_prompt["policy"])]
    frontiers = {k: pareto_frontier(v) for k, v in per_prompt.items()}
    grid = [(round(means["after"][0] + da, 2), round(means["after"][1] + db, 2)) for da, db in FULL_GRID]
    pol = sample_summary(per_prompt["policy"], props)
    result = {"sft": means["after"], "base": means["before"], "minutes": (time.time() - t0) / 60,
              "n_candidates": {k: int(sum(len(s) for s in v)) for k, v in per_prompt.items()},
              "frontiers": {k: f.tolist() for k, f in frontiers.items()},
              "extent": {k: {"max_informative": f[-1].tolist(), "max_cautious": f[0].tolist()}
                         for k, f in frontiers.items()},
              "feasibility": {k: feasibility(f, grid) for k, f in frontiers.items()},
              "sft_margin": {k: frontier_margin(f, *means["after"]) for k, f in frontiers.items()},
              "base_margin": {k: frontier_margin(f, *means["before"]) for k, f in frontiers.items()},
              "sft_samples": pol}
    lines = [f"SFT test means (informative, cautious) {means['after'][0]:.2f}, {means['after'][1]:.2f}; base "
             f"{means['before'][0]:.2f}, {means['before'][1]:.2f}. SFT's own samples ({pol['n']}): "
             f"{pol['mean'][0]:.2f}, {pol['mean'][1]:.2f}, per-sample std {pol['std'][0]:.2f}, {pol['std'][1]:.2f} "
             f"(standard error of a 100-prompt test mean {pol['se_100'][0]:.2f}, {pol['se_100'][1]:.2f}); "
             f"sentences the generator never writes {pol['unknown_sentence_share']:.1%}, off subject "
             f"{pol['off_subject_sentence_share']:.1%}, cut at max_new_tokens {pol['truncated_share']:.1%}"]
    for k, f in frontiers.items():
        lines.append(f"frontier from {k} ({result['n_candidates'][k]} responses): {len(f)} vertices, max informative "
                     f"at {f[-1].round(2).tolist()}, max cautious at {f[0].round(2).tolist()}; margin of SFT "
                     f"{result['sft_margin'][k]:+.2f}, of base {result['base_margin'][k]:+.2f}")
    lines += ["", "| constraint (a, b) | " + " | ".join(f"{k}: feasible, margin" for k in frontiers) + " |",
              "|---" * (len(frontiers) + 1) + "|"]
    for j, (a, b) in enumerate(grid):
        cells = [f"{'✓' if result['feasibility'][k][j][2] else '✗'} {result['feasibility'][k][j][3]:+.2f}"
                 for k in frontiers]
        lines.append(f"| ({a:.2f}, {b:.2f}) | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    np.savez(os.path.join(out, "fig3", "feasibility_scores.npz"),  # per prompt, for further analysis
             **{f"{k}_{i}": s for k in ("any", "train", "policy") for i, s in enumerate(per_prompt[k])})
    with open(os.path.join(out, "fig3", "feasibility.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two bands and one grid point (~10 minutes)")
    p.add_argument("--out", default="out/reproduce")
    p.add_argument("--data_dir", default="out", help="where train.py caches the demo data and base model")
    p.add_argument("--steps", type=int, default=200, help="steps per fine-tuning run")
    p.add_argument("--feasibility", action="store_true",
                   help="only Fig. 3's feasibility: which FULL_GRID thresholds any policy could meet (~10 minutes)")
    a = p.parse_args()
    print(f"reproduce.py: {'about 10 minutes' if a.quick or a.feasibility else 'about an hour'} on a 2-core CPU "
          f"(runs are cached in {a.out}; delete it to start over)", flush=True)
    os.makedirs(a.out, exist_ok=True)
    start = time.time()
    common = ["--val=50", "--test=100", "--eval_every=0", "--ckpt_every=0", "--show=0"]
    # The demo base is pretrained once by the first train.py run that needs it; do it before the pool starts.
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--method=sft", "--steps=1", "--test=8",
                    "--val=8", f"--data_dir={a.data_dir}", f"--out_dir={os.path.join(a.out, 'warmup')}"],
                   check=True, capture_output=True)
    if a.feasibility:
        fig3_feasibility(a.out, a.data_dir, a.steps, 60, common)
        return
    t1 = fig1(a.out)
    print("Fig. 1 done", flush=True)
    t2, r2 = fig2(a.out, QUICK_BANDS if a.quick else FULL_BANDS, a.steps, a.data_dir, common)
    print(t2, flush=True)
    t3, r3 = fig3(a.out, QUICK_GRID if a.quick else FULL_GRID, a.steps, 60, a.data_dir, common)
    print(t3, flush=True)
    minutes = (time.time() - start) / 60
    md = (f"# Toy-scale reproduction ({'--quick' if a.quick else 'full'}, {minutes:.0f} minutes)\n\n"
          f"## Fig. 1: the relaxed log barrier B_(µ,µ²)(z)\n\n{t1}\n\n## Fig. 2: length-constrained L3Ms\n\n{t2}\n\n"
          f"## Fig. 3: two learned rewards, L3M vs MM\n\n{t3}\n")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"quick": a.quick, "minutes": minutes, "fig2": r2, "fig3": r3}, f, indent=2)
    print(f"wrote {a.out}/results.md and results.json in {minutes:.1f} minutes", flush=True)


if __name__ == "__main__":
    main()
