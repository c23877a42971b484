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
    a = p.parse_args()
    print(f"reproduce.py: {'about 10 minutes' if a.quick else 'about an hour'} on a 2-core CPU "
          f"(runs are cached in {a.out}; delete it to start over)", flush=True)
    os.makedirs(a.out, exist_ok=True)
    start = time.time()
    common = ["--val=50", "--test=100", "--eval_every=0", "--ckpt_every=0", "--show=0"]
    # The demo base is pretrained once by the first train.py run that needs it; do it before the pool starts.
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--method=sft", "--steps=1", "--test=8",
                    "--val=8", f"--data_dir={a.data_dir}", f"--out_dir={os.path.join(a.out, 'warmup')}"],
                   check=True, capture_output=True)
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
