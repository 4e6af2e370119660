"""The cost of merging a trained per-layer MoE's experts: validation loss against the number of experts M,
merged across layers into one pool (`unipool convert --experts M`), the same with the pairs chosen at random
(the control for the similarity), or within each layer (the baseline at the same parameter count), without
any training after the merge; and, as anchors, the source and the source with its experts' output removed.

    python experiments/merge_frontier.py                                 # runs/healing/source (demo-vanilla)
    python experiments/merge_frontier.py RUN --experts 42,36,30,24,18,12 --max-tokens 65536

Writes OUT/merge_frontier.json and .png (OUT: the run's directory unless --out). Both merges use the same
similarity (weight cosine) and the same averaging; they differ only in which experts may merge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from unipool.analysis.eval import eval_batches_for, evaluate
from unipool.errors import UnipoolError
from unipool.interop.convert import merge_across_layers, merge_within_layers
from unipool.run import Run


def val_loss(model, batches) -> float:
    res = evaluate(model, batches, device="cpu")
    return res["loss_sum"] / res["tokens"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path, default=Path("runs/healing/source"))
    p.add_argument("--experts", default=None, help="comma-separated M values (default: L*E - L down to 2L, step L)")
    p.add_argument("--max-tokens", type=int, default=65536, help="validation tokens per evaluation")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    run = Run.open(args.run)
    source = run.load_model().eval()
    cfg = source.config
    n_layers, per_layer = cfg.n_layers, cfg.n_routed_experts
    ms = ([int(m) for m in args.experts.split(",")] if args.experts else
          list(range(n_layers * per_layer - n_layers, 2 * n_layers - 1, -n_layers)))
    batches = list(eval_batches_for(run, None, "val", 8, run.train_seq_len, args.max_tokens)[0])
    per_expert = 3 * cfg.d_model * cfg.expert_hidden
    # Anchors: the source, and the source with every expert's output removed (how much the experts matter)
    no_experts = run.load_model().eval()
    with torch.no_grad():
        for pool in no_experts.experts:
            pool.w2_EDF.zero_()
    rows = [{"experts": n_layers * per_layer, "expert_params": n_layers * per_layer * per_expert,
             "source": val_loss(source, batches), "no_experts": val_loss(no_experts, batches)}]

    def across_random(model, m):
        """The control: the same constraint and averaging, pairs chosen at random instead of by cosine."""
        return merge_across_layers(model, m, similarity=torch.randn(n_layers * per_layer, 64,
                                                                    generator=torch.Generator().manual_seed(m)))

    for m in ms:
        row = {"experts": m, "expert_params": m * per_expert}
        for name, merge in (("across_layers", merge_across_layers), ("across_layers_random", across_random),
                            ("within_layers", merge_within_layers)):
            try:
                row[name] = val_loss(merge(source, m), batches)
            except UnipoolError as e:  # e.g. greedy merging across layers stuck near M = E
                row[name + "_error"] = str(e)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = args.out or args.run
    result = {"run": str(args.run), "val_tokens": sum(int((y != -100).sum()) for _, y in batches), "rows": rows}
    (out / "merge_frontier.json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, marker in (("across_layers", "o"), ("across_layers_random", "^"), ("within_layers", "s")):
        pts = [(r["experts"], r[name]) for r in rows[1:] if name in r]
        ax.plot([m for m, _ in pts], [v for _, v in pts], marker=marker, label=name.replace("_", " "))
    ax.axhline(rows[0]["source"], color="gray", ls="--", label=f"source ({rows[0]['experts']} experts)")
    ax.axhline(rows[0]["no_experts"], color="gray", ls=":", label="source without its experts' output")
    ax.set(xlabel="experts kept (M)", ylabel="validation loss (no training after the merge)",
           title="merging a trained per-layer MoE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "merge_frontier.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
