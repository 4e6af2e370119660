"""`unipool compare`: table values against param_report and the metrics, gaps, plots, errors."""

import json
import math

import pytest

from unipool.analysis.compare import compare, markdown_table, summarize_run
from unipool.cli import main
from unipool.config import preset_config
from unipool.model.params import param_report
from unipool.presets import get_preset
from unipool.run import Run

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(root, preset, metrics=None, summary=None):
    Run.create(root, preset_config(preset))
    if metrics is not None:
        (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def curve(n, start, tokens_per_step=512):
    lines = [{"step": s, "tokens": s * tokens_per_step, "loss": start - 0.1 * s, "lr": 1e-3} for s in range(1, n + 1)]
    lines += [{"step": s, "tokens": s * tokens_per_step, "val_loss": start - 0.09 * s, "val_ppl": 0.0}
              for s in range(5, n + 1, 5)]
    return sorted(lines, key=lambda r: r["step"])


def test_compare_two_runs(tmp_path, capsys):
    pool = write_run(tmp_path / "pool", "debug", curve(30, 8.0), {"val_loss": 5.0, "unigram_loss": 6.1})
    vanilla = write_run(tmp_path / "vanilla", "debug-vanilla", curve(20, 8.2))
    out = tmp_path / "report"
    assert main(["compare", str(pool), str(vanilla), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "compare.md").read_text() in printed
    runs = json.loads((out / "compare.json").read_text())
    p, v = runs
    assert (p["name"], p["moe_mode"], p["n_pools"], p["experts_per_pool"]) == ("pool", "pool", 1, 8)
    assert (v["moe_mode"], v["n_pools"], v["experts_per_pool"]) == ("layerwise", 2, 4)
    for r, preset in ((p, "debug"), (v, "debug-vanilla")):
        report = param_report(get_preset(preset))
        assert r["params_total"] == report["total"] and r["params_active"] == report["active"]
        assert r["params_experts"] == report["experts"]
        assert r["expert_budget_vs_matched_vanilla"] == report["expert_budget_vs_matched_vanilla"]
    assert p["val_loss"] == 5.0 and p["val_ppl"] == pytest.approx(math.exp(5.0))  # summary.json wins
    assert v["val_loss"] == pytest.approx(8.2 - 0.09 * 20)  # else the last validation point
    assert (p["tokens"], p["steps"], v["tokens"]) == (30 * 512, 30, 20 * 512)
    assert p["train_curve"][:2] == [[512, 7.9], [1024, 7.8]]
    assert len(p["val_curve"]) == 6 and p["unigram_loss"] == 6.1
    # debug: 1 pool of 8 experts for 2 layers = 50% of vanilla's 8 per layer; debug-vanilla 4 per layer = 50%
    assert "| pool | pool | 1 × 8 | 1 |" in printed and "| 50.0% | 15.4k | 5.0000 | 148.41 |" in printed
    assert "| vanilla | layerwise | 2 × 4 |" in printed
    for name in ("train_loss.png", "val_loss.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_gaps_are_noted_not_fatal(tmp_path):
    bare = write_run(tmp_path / "bare", "debug")  # no metrics.jsonl at all, but a checkpoint
    ckpt = bare / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "tokens": 6144}))
    (bare / "checkpoints" / "LATEST").write_text("step_000003")
    empty = write_run(tmp_path / "empty", "debug", [])
    broken = write_run(tmp_path / "broken", "debug", curve(6, 7.0))
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tokens": 35')  # a line cut off mid-write
    runs, table = compare([bare, empty, broken], tmp_path / "report")
    assert runs[0]["notes"] == ["no metrics.jsonl"] and runs[0]["val_loss"] is None
    assert (runs[0]["tokens"], runs[0]["steps"]) == (6144, 3)  # from the newest checkpoint
    assert runs[1]["notes"] == ["metrics.jsonl has no metrics"] and runs[1]["tokens"] is None
    assert runs[2]["notes"] == ["metrics.jsonl: skipped unreadable line(s) 8"]
    assert runs[2]["tokens"] == 6 * 512 and runs[2]["val_loss"] == pytest.approx(7.0 - 0.45)
    assert "| bare | pool | 1 × 8 | 1 |" in table and "| 6.1k | — | — |" in table and "| — | — | — |" in table
    assert "- bare: no metrics.jsonl" in table and "- broken: metrics.jsonl: skipped" in table
    assert (tmp_path / "report" / "val_loss.png").read_bytes()[:8] == PNG


def test_same_names_are_told_apart(tmp_path):
    a = write_run(tmp_path / "a" / "run", "debug", curve(5, 6.0))
    b = write_run(tmp_path / "b" / "run", "debug", curve(5, 6.0))
    runs, _ = compare([a, b], tmp_path / "out")
    assert [r["name"] for r in runs] == [str(a), str(b)]


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    for target, message in ((tmp_path / "missing", "no such run directory"), (tmp_path, "not a run directory"),
                            (bad, "unreadable run config")):
        assert main(["compare", str(target), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_markdown_table_formats_missing_values(tmp_path):
    run = summarize_run(write_run(tmp_path / "r", "debug"))
    lines = markdown_table([run]).splitlines()
    assert lines[0].startswith("| run | mode |") and lines[1] == "|" + "---|" * 11


def test_diverged_runs_still_give_valid_json(tmp_path):
    huge = write_run(tmp_path / "huge", "debug", curve(5, 6.0), {"val_loss": 800.0})  # exp(800) overflows
    nan = write_run(tmp_path / "nan", "debug", curve(5, 6.0), {"val_loss": math.nan, "unigram_loss": math.inf})
    runs, _ = compare([huge, nan], tmp_path / "report")
    assert runs[0]["val_loss"] == 800.0 and runs[0]["val_ppl"] == pytest.approx(math.exp(50))  # capped as eval does
    assert runs[1]["val_loss"] == pytest.approx(6.0 - 0.45) and runs[1]["unigram_loss"] is None  # from the metrics
    assert "summary.json's val_loss is nan" in runs[1]["notes"]

    def refuse(constant):
        raise AssertionError(f"{constant} in compare.json")

    json.loads((tmp_path / "report" / "compare.json").read_text(), parse_constant=refuse)
