"""Render study 3's table in docs/results.md from the study's committed results.json.

    python experiments/family_table.py                         # print the table
    python experiments/family_table.py --write docs/results.md  # replace it between the markers

The table's numbers are read, never typed: per row the seeds finished, the mean validation loss, the
paired difference to vanilla and to UniPool (mean; with 2+ seeds its standard error and 95% t interval,
with 1 seed the single paired observation), and the routing columns of the study's report (means over
seeds), layers per expert being how many layers use each expert (reuse across depth). The markers in docs/results.md are `<!-- family-table:begin -->` and `<!-- family-table:end -->`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ci95, load_study, paired_deltas  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- family-table:begin -->", "<!-- family-table:end -->"


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


def render(study_file: Path) -> str:
    study = load_study(study_file)
    results = json.loads((ROOT / study["results_dir"] / "results.json").read_text())
    by_name = {r["variant"]: r for r in results}
    vanilla, unipool = by_name.get("vanilla", {}), by_name.get("unipool", {})
    lines = ["| row | seeds | val loss | − vanilla (paired) | − unipool (paired) | zero-gate tokens | gate sum "
             "| U(x)/L | dead experts | layers per expert |", "|---|---|---|---|---|---|---|---|---|---|"]
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
                     f"| {row['dead_experts'][0]:.1f} | {row['layers_per_expert'][0]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, default=ROOT / "experiments" / "family.yaml")
    p.add_argument("--write", type=Path, help="a markdown file whose table between the markers is replaced")
    args = p.parse_args()
    table = render(args.study)
    if args.write is None:
        print(table)
        return
    text = args.write.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{args.write}: needs exactly one {BEGIN} and one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    args.write.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(f"wrote the table into {args.write}")


if __name__ == "__main__":
    main()
