"""`generate()` on an exported model under transformers: per-expert loop vs grouped GEMMs vs a dense limit.

    python bench/hf_generate.py                   # CPU: demo pool (M=48) and study pool (M=96), batch 1 and 8
    python bench/hf_generate.py --new-tokens 32 --batches 1

Each model is exported with `unipool.hf.export_hf` (random weights moved off their init, so routers
spread tokens over the pool), loaded with AutoModelForCausalLM(trust_remote_code=True), and asked for
greedy `generate()` of a fixed number of new tokens with the KV cache. The variants run in one process
on the same export, interleaved over --rounds:
- loop: the export's fallback, a Python loop over the experts that received tokens (what exports did
  before grouped GEMMs);
- grouped: sort + torch._grouped_mm for every call (expert_kernel="grouped_mm");
- auto: the export's default: grouped GEMMs on a GPU; on CPU grouped GEMMs from 8 routed rows up and the
  loop below (a decoding step of a small batch);
- dense: the same model with a pool of ONE expert (top-1), i.e. a dense SwiGLU FFN with the same active
  parameters: the limit a routed FFN can approach.
tokens/s counts new tokens over the whole call (prefill included), batch x new tokens / seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, meta, print_table, resolve, summarize, time_fn, write_json  # noqa: E402

from unipool.interop.hf import export_hf  # noqa: E402
from unipool.model.model import build_model  # noqa: E402
from unipool.presets import get_preset  # noqa: E402

MODELS = {  # label -> ModelConfig changes on top of the demo preset
    "demo pool M=48 (6L, d=128)": {},
    "study pool M=96 (12L, d=128)": dict(d_model=128, n_layers=12, num_experts=96),
}


def export(cfg, out: Path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, None, out, force=True)  # each model of the table is exported to the same directory
    return AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--rounds", type=int, default=2, help="passes over all variants (interleaved, for noise)")
    args = p.parse_args(argv)
    device, dtype = resolve(args)
    batches = [int(b) for b in args.batches.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, changes in MODELS.items():
            cfg = get_preset("demo").replace(**changes)
            hf = export(cfg, Path(tmp) / "pool").to(device, dtype)
            dense = export(cfg.replace(num_experts=1), Path(tmp) / "dense").to(device, dtype)
            for batch in batches:
                ids = torch.randint(1, cfg.vocab_size, (batch, args.prompt),
                                    generator=torch.Generator().manual_seed(batch)).to(device)
                kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
                cases = {"loop": (hf, "loop"), "grouped": (hf, "grouped_mm"), "auto": (hf, "auto"),
                         "dense": (dense, "auto")}
                times: dict[str, list[float]] = {v: [] for v in cases}
                outputs = {}
                for _ in range(args.rounds):
                    for variant, (model, kernel) in cases.items():
                        for pool in model.model.experts:
                            pool.kernel = kernel

                        def run(model=model, variant=variant):
                            with torch.no_grad():
                                outputs[variant] = model.generate(ids, **kw)
                        times[variant] += time_fn(run, device, args.repeats, args.warmup)
                assert torch.equal(outputs["loop"], outputs["grouped"]), "grouped GEMMs changed the greedy tokens"
                assert torch.equal(outputs["loop"], outputs["auto"]), "the default kernel changed the greedy tokens"
                row = {"model": label, "experts": cfg.num_experts, "batch": batch}
                for variant, t in times.items():
                    s = summarize(t)
                    row[f"{variant}_tok_s"] = batch * args.new_tokens / s["median_s"]
                    row[f"{variant}_spread"] = s["spread"]
                row["grouped_vs_loop"] = row["grouped_tok_s"] / row["loop_tok_s"]
                row["auto_vs_loop"] = row["auto_tok_s"] / row["loop_tok_s"]
                row["auto_vs_dense"] = row["auto_tok_s"] / row["dense_tok_s"]
                rows.append(row)
                print(f"{label} batch {batch}: loop {row['loop_tok_s']:.0f}, grouped {row['grouped_tok_s']:.0f}, "
                      f"auto {row['auto_tok_s']:.0f}, dense {row['dense_tok_s']:.0f} tok/s", flush=True)

    print(f"\nExport generate(), greedy with KV cache, {args.prompt}-token prompt + {args.new_tokens} new tokens, "
          f"{dtype}, new tokens/s")
    print_table(rows, [("model", "model", "s"), ("batch", "batch", "d"), ("loop_tok_s", "loop", ".0f"),
                       ("grouped_tok_s", "grouped", ".0f"), ("auto_tok_s", "auto", ".0f"),
                       ("dense_tok_s", "dense limit", ".0f"), ("grouped_vs_loop", "grouped/loop", ".2f"),
                       ("auto_vs_loop", "auto/loop", ".2f"), ("auto_vs_dense", "auto/dense", ".2f"),
                       ("auto_spread", "spread", ".2f")])
    import transformers

    write_json(args.json, "hf_generate", device,
               {"meta": {**meta(device, dtype, args), "transformers": transformers.__version__}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
