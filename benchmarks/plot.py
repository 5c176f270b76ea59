"""Benchmark results as PNG figures, where a picture reads better than the table.

    python -m benchmarks.plot benchmarks/results_offload_sparse.json benchmarks/results_drafters.json \
        [--out docs/figures] [--predictor-curve benchmarks/results_predictors.json]

Each file is recognised by what it holds:
- benchmarks/offload.py: tok/s per mode on a log scale, each bar labelled with its speed-up over naive
  streaming (`<name>.png`); with `offload_sparse` rows, also `<name>_sparsity.png`: the paper's approximate
  inference per density (its agreement with the dense model, and its speed-up), beside the predictors'
  teacher-forced curve (an oracle, the predictors, a fixed hot set) when the result carries it or
  --predictor-curve names tools/train_predictors.py's report.
- benchmarks/drafters.py: tok/s and tokens per target pass per drafter and workload, HF's peers beside
  them (`<name>.png`).
Needs matplotlib (in the dev extras).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_offload(result: dict, out: Path, curve: list[dict] | None = None) -> list[Path]:
    plt = _pyplot()
    naive = result.get("tokens_per_s_naive")
    rows = [r for r in result["rows"] if r.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [r["mode"] for r in rows]
    speeds = [r["tokens_per_s"] for r in rows]
    ax.barh(names, speeds, color=["tab:gray" if n == "dense" else "tab:orange" if n.startswith("offload_sparse")
                                  else "tab:blue" for n in names])
    for i, s in enumerate(speeds):
        ax.text(s, i, f" {s:.2f}" + (f" ({s / naive:.1f}x)" if naive else ""), va="center", fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    disk = result.get("disk", {})
    where = f"emulated disk {disk['mb_s']:g} MB/s + {disk['latency_us']:g} us" if disk.get("emulated") else "own disk"
    ax.set_xlabel("tokens/s (log); in brackets: x naive streaming")
    ax.set_title(f"{result['model']}: {result['model_gb']} GB, DRAM budget {result['budget_gb']} GB, {where}\n"
                 "orange: approximate (the paper's sparse inference); the rest exact", fontsize=9)
    paths = [out.with_suffix(".png")]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    sparse = result.get("offload_sparse") or []
    if sparse:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        curve = result.get("predictor_curve") or curve or []
        for key, label, style in (("oracle_magnitude", "oracle: each token's true top neurons", "k--"),
                                  ("predictor", "the predictors' top neurons", "b--"),
                                  ("hot_set", "a fixed hot set", "g--")):
            if curve:
                left.plot([c["density"] for c in curve], [c[key] for c in curve], style, label=label, alpha=0.6)
        left.plot([s["density"] for s in sparse], [s["agreement"] for s in sparse], "o-", color="tab:orange",
                  label="offload_sparse (generating; predictors)")
        left.set_xlabel("neurons kept per token")
        left.set_ylabel("next-token agreement with the dense model")
        left.set_ylim(0, 1.02)
        left.legend(fontsize=7)
        right.plot([s["density"] for s in sparse], [s["speedup_over_naive"] for s in sparse], "o-",
                   color="tab:orange", label="offload_sparse")
        for key, label, style in (("speedup_offload_over_naive", "exact offload", "b:"),
                                  ("speedup_offload_spec_over_naive", "exact offload + int4 self-draft", "g:")):
            if result.get(key):
                right.axhline(result[key], linestyle=style[1:], color=style[0], label=label)
        right.axhline(4, color="red", linewidth=0.8, label="the paper's CPU figure (4x)")
        right.set_xlabel("neurons kept per token")
        right.set_ylabel("x naive streaming")
        right.set_ylim(bottom=0)
        right.legend(fontsize=7)
        fig.suptitle("The paper's approximate inference: what sparsity buys and what it costs", fontsize=10)
        paths.append(out.with_name(out.name + "_sparsity.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_drafters(result: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    drafters = list(dict.fromkeys(r["drafter"] for r in result["rows"]))
    peers = list(dict.fromkeys(p["method"] for p in result.get("peers", [])))
    by = {(r["workload"], r["drafter"]): r for r in result["rows"]}
    peer = {(p["workload"], p["method"]): p for p in result.get("peers", [])}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    series = drafters + peers
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(workloads))]
        if name in drafters:
            top.bar(xs, [by.get((w, name), {}).get("tokens_per_s", 0) for w in workloads], width, label=name)
            bottom.bar(xs, [by.get((w, name), {}).get("tokens_per_pass", 0) for w in workloads], width)
        else:
            top.bar(xs, [peer.get((w, name), {}).get("tokens_per_s", 0) for w in workloads], width, label=name,
                    hatch="//", alpha=0.6)
    top.set_ylabel("tokens/s")
    top.legend(fontsize=7, ncol=4)
    top.set_title(f"{result.get('target', '')} {result.get('dtype', '')}: drafters per workload", fontsize=10)
    bottom.set_ylabel("tokens per target pass")
    bottom.set_xticks(range(len(workloads)), workloads)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot(path: Path, out_dir: Path, predictor_curve: Path | None = None) -> list[Path]:
    result = json.loads(Path(path).read_text())
    out = out_dir / Path(path).stem.removeprefix("results_")
    if "tokens_per_s_naive" in result:
        curve = json.loads(predictor_curve.read_text())["curve"] if predictor_curve else None
        return plot_offload(result, out, curve)
    if result.get("rows") and "drafter" in result["rows"][0]:
        return plot_drafters(result, out)
    raise ValueError(f"{path}: neither an offload nor a drafters result (no tokens_per_s_naive, no drafter rows)")


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--predictor-curve", type=Path, help="tools/train_predictors.py's report (predictors.json)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [p for path in args.results for p in plot(path, args.out, args.predictor_curve)]
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
