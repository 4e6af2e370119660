"""Render study 3's table in docs/results.md from the study's committed results.json.

    python experiments/family_table.py                         # print the tables
    python experiments/family_table.py --write docs/results.md  # replace it between the markers

The table's numbers are read, never typed: per row the seeds finished, the mean validation loss, the
paired difference to vanilla and to UniPool (mean; with 2+ seeds its standard error and 95% t interval,
with 1 seed the single paired observation), and the routing columns of the study's report (means over
seeds), layers per expert being how many layers use each expert (reuse across depth) and, beside it, the
share of experts that serve 2 or more layers. The markers in docs/results.md are `<!-- family-table:begin -->`
and `<!-- family-table:end -->`.

The contrast table (`<!-- family-contrasts:begin -->` ... `<!-- family-contrasts:end -->`) gives, for every
row against vanilla, every row against UniPool and the study file's `read_contrasts` (the further pairs the
write-up reads), the paired difference per seed, its mean and 95% t interval, how many seeds fall below 0
and whether the interval excludes 0: the facts the prose interprets, so that no number there is typed.

The cost table (`<!-- family-cost:begin -->` ... `<!-- family-cost:end -->`) is rendered the same way from
bench/family_cost.py's committed JSON (bench/results/family_cost_cpu.json): each design's training-step time
and peak memory, measured side by side in one run, as ratios to vanilla. A row whose measured settings differ
from the study file's current ones reads "not measured".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ci95, load_study, paired_contrasts, paired_deltas, results_path, run_config  # noqa: E402

from unipool.errors import UnipoolError, read_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- family-table:begin -->", "<!-- family-table:end -->"
COST_BEGIN, COST_END = "<!-- family-cost:begin -->", "<!-- family-cost:end -->"
PAIRS_BEGIN, PAIRS_END = "<!-- family-contrasts:begin -->", "<!-- family-contrasts:end -->"
COST_JSON = ROOT / "bench" / "results" / "family_cost_cpu.json"


def paired(a: dict[str, float], b: dict[str, float]) -> str:
    """a − b over the seeds both have: mean, then SE and interval (2+ seeds) or 'one seed'."""
    deltas = list(paired_deltas(a, b).values())
    if not deltas:
        return ""
    mean = statistics.fmean(deltas)
    stats = ci95(deltas)
    if stats is None:
        return f"{mean:+.3f} (one seed)"
    se, lo, hi = stats
    return f"{mean:+.3f}, SE {se:.3f}, [{lo:+.3f}, {hi:+.3f}]"


def read_results(path: Path, made_by: str) -> dict | list:
    """A committed JSON file, or one line naming it and the command that writes it."""
    try:
        return read_json(path)
    except UnipoolError as e:
        raise SystemExit(f"error: {e} (written by {made_by})") from None


def study_results(study_file: Path) -> tuple[dict, dict[str, dict]]:
    """The study file and its committed report's rows by variant name."""
    study = load_study(study_file)
    results = read_results(results_path(study) / "results.json",
                           f"python experiments/study.py {study_file} --report")
    return study, {r["variant"]: r for r in results}


def render(study_file: Path) -> str:
    study, by_name = study_results(study_file)
    vanilla, unipool = by_name.get("vanilla", {}), by_name.get("unipool", {})
    lines = ["| row | seeds | val loss | − vanilla (paired) | − unipool (paired) | zero-gate tokens | gate sum "
             "| U(x)/L | dead experts | layers per expert (experts serving 2+) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in study["variants"]:
        row = by_name.get(name)
        if row is None or not row.get("val_losses"):
            lines.append(f"| {name} | 0 | not run yet | | | | | | | |")
            continue
        losses = row["val_losses"]
        d_van = paired(losses, vanilla.get("val_losses", {})) if name != "vanilla" else ""
        d_uni = paired(losses, unipool.get("val_losses", {})) if name != "unipool" else ""
        lines.append(f"| {name} | {len(losses)} | {row['val_loss'][0]:.3f} | {d_van} | {d_uni} "
                     f"| {100 * row['zero_gate'][0]:.1f}% | {row['gate_sum'][0]:.3f} | {row['u_fraction'][0]:.3f} "
                     f"| {row['dead_experts'][0]:.1f} | {row['layers_per_expert'][0]:.2f} "
                     f"({100 * row['shared_experts'][0]:.0f}%) |")
    return "\n".join(lines)


def contrast_pairs(study: dict) -> list[tuple[str, str]]:
    """Every row − vanilla, every row − UniPool, then the study's `read_contrasts`; each pair once, and
    once in either order (a read contrast replaces an automatic row that is its mirror)."""
    names = list(study["variants"])
    pairs = [(v, "vanilla") for v in names if v != "vanilla"]
    pairs += [(v, "unipool") for v in names if v not in ("unipool", "vanilla")]  # vanilla − unipool: the mirror
    read = [tuple(pair) for pair in (study.get("read_contrasts") or {}).values()]
    kept: list[tuple[str, str]] = []
    for a, b in [(a, b) for a, b in pairs if (b, a) not in read] + read:
        if (a, b) not in kept and (b, a) not in kept:
            kept.append((a, b))
    return kept


def render_contrasts(study_file: Path) -> str:
    study, by_name = study_results(study_file)
    rows = [{"variant": v, "val_losses": by_name.get(v, {}).get("val_losses") or {}} for v in study["variants"]]
    pairs = contrast_pairs(study)
    found = {(c["a"], c["b"]): c for c in paired_contrasts({"contrasts": {f"{a} − {b}": [a, b] for a, b in pairs}},
                                                           rows)}
    lines = ["| a − b | seeds | mean | 95% CI | per seed (seed order) | seeds below 0 | interval |",
             "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        c = found.get((a, b))
        if c is None:  # no seed finished by both
            lines.append(f"| {a} − {b} | 0 | | | | | |")
            continue
        deltas = list(c["deltas"].values())
        ci, side = "–", "one seed"
        if "ci95" in c:
            lo, hi = c["ci95"]
            ci = f"[{lo:+.3f}, {hi:+.3f}]"
            side = "below 0" if hi < 0 else "above 0" if lo > 0 else "spans 0"
        below = sum(d < 0 for d in deltas)
        lines.append(f"| {a} − {b} | {len(deltas)} | {c['mean']:+.3f} | {ci} "
                     f"| {', '.join(f'{d:+.3f}' for d in deltas)} | {below} of {len(deltas)} | {side} |")
    return "\n".join(lines)


def render_cost(study_file: Path, cost_json: Path = COST_JSON) -> str:
    """The cost table: every row of the study, in its order, from the benchmark's JSON."""
    study = load_study(study_file)
    bench = read_results(cost_json, f"python bench/family_cost.py --study {study_file}")
    if Path(bench["study"]).name != study_file.name:
        raise SystemExit(f"{cost_json} measured {bench['study']}, not {study_file}: run bench/family_cost.py "
                         f"--study {study_file} --json <file> and pass it as --cost-json")
    by_name = {r["variant"]: r for r in bench["rows"]}
    meta = bench["meta"]
    lines = [f"`python bench/family_cost.py {cost_args(meta)}` at commit `{meta.get('commit') or 'not recorded'}`, "
             f"{meta['date_utc']} UTC, {meta['device']}, torch {meta['torch']}, {meta['dtype']}, load average "
             f"{meta['load_avg_1m']:.1f} before the first round:", "",
             "| row | s/step | x vanilla | fastest round x vanilla | per-round medians (s) | peak RSS MB | x vanilla "
             "| params | active |", "|---|---|---|---|---|---|---|---|---|"]
    if "vanilla" not in by_name:
        raise SystemExit(f"error: {cost_json} has no vanilla row: the costs are ratios to it")
    fastest_vanilla = min(by_name["vanilla"]["per_round_median_s"])
    for name in study["variants"]:
        row = by_name.get(name)
        if row is None or not measured_as(row, study, name):
            lines.append(f"| {name} | not measured | | | | | | | |")
            continue
        rounds = row["per_round_median_s"]
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['time_vs_vanilla']:.2f} "
                     f"| {min(rounds) / fastest_vanilla:.2f} | {', '.join(f'{t:.2f}' for t in rounds)} "
                     f"| {row['peak_rss_mb']:,.0f} | {row['memory_vs_vanilla']:.2f} | {row['total']:,} | {row['active']:,} |")
    return "\n".join(lines)


def measured_as(row: dict, study: dict, name: str) -> bool:
    """Whether a cost row measured what the study file now runs as `name`: its whole run config (base and
    overrides) where the JSON records it, else (older JSON) the row's overrides."""
    if "config" in row:
        return row["config"] == json.loads(json.dumps(run_config(study, name, 0, None)))  # JSON's types
    return row.get("overrides") == study["variants"][name]


def cost_args(meta: dict) -> str:
    args = meta["args"]
    return " ".join(f"--{k} {args[k]}" for k in ("steps", "warmup", "rounds") if k in args)


def replace_between(text: str, begin: str, end: str, body: str, where: Path) -> str:
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"{where}: needs exactly one {begin} and one {end}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, default=ROOT / "experiments" / "family.yaml")
    p.add_argument("--cost-json", type=Path, default=COST_JSON, help="bench/family_cost.py's JSON for this study")
    p.add_argument("--write", type=Path, help="a markdown file whose tables between the markers are replaced "
                                              "(the contrast and cost tables only where their markers are)")
    args = p.parse_args()
    table = render(args.study)
    if args.write is None:
        print(f"{table}\n\n{render_contrasts(args.study)}")
        if args.cost_json.is_file():
            print(f"\n{render_cost(args.study, args.cost_json)}")
        return
    if not args.write.is_file():
        raise SystemExit(f"error: {args.write} not found: --write replaces the tables in an existing file")
    text = replace_between(args.write.read_text(), BEGIN, END, table, args.write)
    if PAIRS_BEGIN in text:
        text = replace_between(text, PAIRS_BEGIN, PAIRS_END, render_contrasts(args.study), args.write)
    if COST_BEGIN in text:
        text = replace_between(text, COST_BEGIN, COST_END, render_cost(args.study, args.cost_json), args.write)
    args.write.write_text(text)
    print(f"wrote the tables into {args.write}")


if __name__ == "__main__":
    main()
