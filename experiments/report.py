"""Markdown tables from the committed results (so README numbers are copied, not retyped).

    python experiments/report.py [--results experiments/results]

Reads restart_ablation.json, restart_ablation_seed*.json and probe_kv.json (any may be
missing) and prints the tables of the README section "The dual information stream" on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def pct(x) -> str:
    """A fraction as a percentage with one decimal ('-' for None)."""
    return "-" if x is None else f"{100 * x:.1f}"


def ablation_table(res: dict) -> str:
    """Rows of restart_ablation.json as a markdown table (accuracy and Wilson 95% CI in %)."""
    out = ["| model | mode | correct / n | accuracy % | 95% CI (Wilson) % | top failure reasons |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        fails = ", ".join(f"{k} ({v})" for k, v in r["failure_reasons"].items() if k != "ok")
        fails = fails if len(fails) < 90 else fails[:87] + "..."
        out.append(f"| {r['model']} | {r['mode']} | {r['correct']} / {r['n']} | {pct(r['accuracy'])} | "
                   f"{pct(r['ci95_low'])} - {pct(r['ci95_high'])} | {fails or '-'} |")
    out.append("")
    out.append("| model | memento only correct | restart only correct | both | neither | exact McNemar p |")
    out.append("|---|---|---|---|---|---|")
    for m, p in res["paired"].items():
        out.append(f"| {m} | {p['memento_only']} | {p['restart_only']} | {p['both']} | {p['neither']} | {p['mcnemar_p']:.3g} |")
    return "\n".join(out)


def seed_table(results: list[tuple[str, dict]]) -> str:
    """One line per training seed: accuracy % of each (model, mode) row, and the McNemar p of
    stage 2 memento vs restart. `results` is [(label, restart_ablation JSON)]."""
    cols = [("stage2", "memento"), ("stage2", "restart"), ("stage1", "memento"), ("stage1", "restart"), ("stage1", "full")]
    out = ["| training seed | " + " | ".join(f"{m} {mode}" for m, mode in cols) + " | stage 2 McNemar p |",
           "|---|" + "---|" * (len(cols) + 1)]
    for label, res in results:
        acc = {(r["model"], r["mode"]): r["accuracy"] for r in res["rows"]}
        out.append(f"| {label} | " + " | ".join(pct(acc.get(c)) for c in cols) + f" | {res['paired']['stage2']['mcnemar_p']:.2g} |")
    return "\n".join(out)


def probe_tables(res: dict) -> str:
    """Per-layer (M1/M2/M3) and per-distance probe accuracy tables, normal vs restart, in %."""
    P = res["probes"]
    L = res["model"]["layers"]
    get = lambda mode, m, l: next((p["test_acc"] for p in P if p["mode"] == mode and p["memento"] == m and p["layer"] == l), None)  # noqa: E731
    layers = list(range(L)) + ["all"]
    out = ["| memento | mode | " + " | ".join(f"layer {l}" for l in layers) + " |", "|---|---|" + "---|" * len(layers)]
    for m, what in ((1, "M1 (before T2, control)"), (2, "M2 (saw T2)"), (3, "M3 (never saw T2)")):
        for mode in ("normal", "restart"):
            out.append(f"| {what} | {mode} | " + " | ".join(pct(get(mode, m, l)) for l in layers) + " |")
    ks = sorted({p["k"] for p in P if p["k"] >= 0})
    out += ["", "| k (memento M(2+k)) | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for mode in ("normal", "restart"):
        for l in (L - 1, "all"):
            out.append(f"| {mode}, layer {l} | " + " | ".join(pct(get(mode, k + 2, l)) for k in ks) + " |")
    C = res.get("checkpoints") or []
    if C:
        out += ["", "| checkpoint | task accuracy % (n) | memento sum accuracy % (forced) | probe M2 all layers % | probe M3 all layers % |",
                "|---|---|---|---|---|"]
        for c in C:
            out.append(f"| {c['name']} | {pct(c['task_accuracy'])} ({c['task_n']}) | {pct(c['memento_sum_accuracy'])} | "
                       f"{pct(c['probe_M2_all'])} | {pct(c['probe_M3_all'])} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    d = Path(args.results)
    for name, fn in (("restart_ablation.json", ablation_table), ("probe_kv.json", probe_tables)):
        f = d / name
        if f.is_file():
            res = json.loads(f.read_text())
            print(f"### {name} (wall {res['wall_seconds']:.0f} s, {res['machine']['cpu_model']}, "
                  f"{res['machine']['cpu_count']} cores, torch {res['machine']['torch']})\n")
            print(fn(res) + "\n")
        else:
            print(f"({name} not found)\n")
    seeds = sorted(d.glob("restart_ablation_seed*.json"), key=lambda f: int(f.stem.removeprefix("restart_ablation_seed")))
    if seeds and (d / "restart_ablation.json").is_file():
        results = [("42 (default)", json.loads((d / "restart_ablation.json").read_text()))]
        results += [(f.stem.removeprefix("restart_ablation_seed"), json.loads(f.read_text())) for f in seeds]
        print("### restart_ablation across training seeds (accuracy %)\n")
        print(seed_table(results) + "\n")


if __name__ == "__main__":
    main()
