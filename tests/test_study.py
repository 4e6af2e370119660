"""experiments/study.py end to end: parallel runs, skip on rerun, the paired table and the routing columns."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TEXTS

ROOT = Path(__file__).resolve().parents[1]


def study(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "study.py"), str(tmp_path / "study.yaml"),
                           *args], capture_output=True, text=True, cwd=tmp_path)


def test_study_runs_skips_and_reports(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\f".join(t.strip() for t in TEXTS[:40]))
    small = dict(vocab_multiple=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                 max_seq_len=32, top_k=1)
    train = dict(steps=4, batch_size=2, seq_len=32, lr=3e-3, eval_interval=2, eval_tokens=256, ckpt_interval=2,
                 routing_interval=2, sample_tokens=0, log_interval=1, precision="fp32")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "kept"), "seeds": [0, 1], "target_se": 0.01,
        "base": {"model": small, "train": train,
                 "data": {"sources": [str(corpus)], "tokenizer": "bpe:320", "data_dir": str(tmp_path / "data")}},
        "variants": {"vanilla": {"moe_mode": "layerwise", "num_experts": 4, "router": "softmax",
                                 "switch_loss_coef": 0.01, "pool_loss_coef": 0.0},
                     "unipool": {"moe_mode": "pool", "num_experts": 8, "router": "norm", "pool_loss_coef": 0.01}},
        "contrasts": {"unipool minus vanilla": ["unipool", "vanilla"]}},
        sort_keys=False))

    first = study(tmp_path, "--jobs", "2")
    assert first.returncode == 0, first.stderr + first.stdout
    assert first.stdout.count("trained in") == 4
    # one whole line per run, even with two runs finishing together
    assert [ln.count("] ") for ln in first.stdout.splitlines() if "trained in" in ln] == [1] * 4
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    for name in ("vanilla", "unipool"):
        summaries = [json.loads((tmp_path / "out" / f"{name}-s{s}" / "summary.json").read_text()) for s in (0, 1)]
        assert rows[name]["val_losses"] == {str(s): summaries[s]["val_loss"] for s in (0, 1)}
        assert rows[name]["val_loss"][0] == pytest.approx((summaries[0]["val_loss"] + summaries[1]["val_loss"]) / 2)
        assert (tmp_path / "out" / f"{name}-s0" / "routing" / "utilisation_heatmap.png").is_file()
    paired = [rows["unipool"]["val_losses"][s] - rows["vanilla"]["val_losses"][s] for s in ("0", "1")]
    assert rows["unipool"]["delta_paired"][0] == pytest.approx(sum(paired) / 2)
    half = 12.706 * abs(paired[0] - paired[1]) / 2  # t(1) x sd / sqrt(2), sd = |a - b| / sqrt(2)
    assert rows["unipool"]["delta_ci95"] == pytest.approx([sum(paired) / 2 - half, sum(paired) / 2 + half])
    assert "delta_ci95" not in rows["vanilla"]
    [contrast] = json.loads((tmp_path / "out" / "contrasts.json").read_text())  # the same pairs, named
    assert contrast["mean"] == pytest.approx(rows["unipool"]["delta_paired"][0])
    assert contrast["ci95"] == pytest.approx(rows["unipool"]["delta_ci95"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| unipool minus vanilla | unipool − vanilla | 2 |" in table
    # every variant against vanilla, with the seeds the target SE would take at this spread: (sd / 0.01)^2
    need = max(2, math.ceil((abs(paired[0] - paired[1]) / math.sqrt(2) / 0.01) ** 2))
    [vs] = [line for line in table.splitlines() if line.startswith("| unipool | unipool − vanilla |")]
    assert "seeds for SE ≤ 0.01" in table and vs.endswith(f"| {need} |")
    assert "delta_paired" not in rows["vanilla"]  # no difference to itself: the table shows "–"
    assert rows["vanilla"]["u_fraction"][0] == 1.0  # private experts: every layer is a new expert
    assert rows["vanilla"]["zero_gate"][0] == 0.0  # softmax gates are never zero
    assert rows["unipool"]["expert_budget"] == 0.5  # 8 experts vs 8 per layer x 2 layers
    assert rows["vanilla"]["n_pools"] == 2
    for png in ("curves.png", "zero_gate.png", "dead_rows.png", "depth_usage.png"):
        assert (tmp_path / "out" / "report" / png).read_bytes()[:4] == b"\x89PNG"

    again = study(tmp_path)  # finished runs are skipped, the table is the same
    assert again.returncode == 0 and "trained in" not in again.stdout
    rerun = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["variant"] for r in rerun] == ["vanilla", "unipool"]  # the study file's order
    assert rerun == list(rows.values())

    # every finished run left a record: on a machine without the run directories, nothing is trained again
    # and the report is the same
    records = sorted(p.name for p in (tmp_path / "kept" / "runs").iterdir())
    assert records == ["unipool-s0.json", "unipool-s1.json", "vanilla-s0.json", "vanilla-s1.json"]
    shutil.rmtree(tmp_path / "out")
    elsewhere = study(tmp_path, "--jobs", "2")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert elsewhere.stdout.count("done (recorded)") == 4 and "trained in" not in elsewhere.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == list(rows.values())
    assert (tmp_path / "out" / "report" / "depth_usage.png").is_file()
    plan = study(tmp_path, "--plan")
    assert plan.stdout.strip().splitlines()[-1] == "4 runs: 4 done"

    # seed 0 carried (lost runs, known by their losses and the routing statistics' mean and SD), seed 1
    # recorded: the pooled report is the report of both seeds
    spec = yaml.safe_load((tmp_path / "study.yaml").read_text())
    spec["seeds"] = [0]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert study(tmp_path, "--report").returncode == 0
    seed0 = json.loads((tmp_path / "out" / "results.json").read_text())
    configs = {r["variant"]: json.loads((tmp_path / "kept" / "runs" / f"{r['variant']}-s0.json").read_text())["config"]
               for r in seed0}
    carried = {"rows": [{**r, "config": configs[r["variant"]]} for r in seed0]}
    (tmp_path / "kept" / "carried.json").write_text(json.dumps(carried))
    spec["seeds"] = [0, 1]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    twice = study(tmp_path, "--report")
    assert twice.returncode != 0 and "seed 0 is both finished" in twice.stderr and "carried" in twice.stderr
    for name in ("vanilla", "unipool"):
        (tmp_path / "kept" / "runs" / f"{name}-s0.json").unlink()
    assert study(tmp_path, "--report").returncode == 0
    pooled_rows = json.loads((tmp_path / "out" / "results.json").read_text())
    for got, want in zip(pooled_rows, rows.values()):
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, abs=1e-9) if key not in ("val_losses", "variant", "router",
                                                                             "moe_mode") else value), key
    # a recorded run is final: a stray directory of it here (a crash before its first checkpoint) is not
    # trained again, so its committed record is not overwritten
    (tmp_path / "out" / "vanilla-s1").mkdir()
    stray = study(tmp_path, "--jobs", "2")
    assert stray.returncode == 0 and "trained in" not in stray.stdout and "restarted" not in stray.stdout
    # a damaged record (a merge conflict) or carried file: one line naming it, before anything trains
    record = tmp_path / "kept" / "runs" / "unipool-s1.json"
    good = record.read_text()
    conflict = "<<<<<<< HEAD\n" + good
    for damaged, commands in ((conflict, (["--jobs", "2"], ["--plan"], ["--report"])), ("{}", (["--report"],)),
                              ("[]", (["--report"],))):
        record.write_text(damaged)
        for args in commands:
            r = study(tmp_path, *args)
            assert r.returncode != 0 and "Traceback" not in r.stderr and "trained in" not in r.stdout, (damaged, args)
            assert f"{record}: " in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    record.write_text(good)
    renamed = {"rows": [{**row, "variant": "vanilla-old"} if row["variant"] == "vanilla" else row
                        for row in carried["rows"]]}
    (tmp_path / "kept" / "carried.json").write_text(json.dumps(renamed))
    r = study(tmp_path, "--report")
    assert r.returncode != 0 and "row 'vanilla-old' is not a variant of the study file" in r.stderr
    (tmp_path / "kept" / "carried.json").write_text(json.dumps(carried))

    # a smoke study (--steps) neither reads nor writes the study's records and results
    kept = {p: p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()}
    # (had it read them, their 4-step configs would be refused as drift against its 2-step rows)
    smoke = study(tmp_path, "--steps", "2", "--out", str(tmp_path / "smoke"), "--report")
    assert smoke.returncode == 0, smoke.stderr
    assert "not run" in smoke.stdout and (tmp_path / "smoke" / "results.json").is_file()
    assert {p: p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()} == kept

    # a row changed after its runs finished: the report refuses to file their losses under the new row
    spec = yaml.safe_load((tmp_path / "study.yaml").read_text())
    spec["variants"]["unipool"]["num_experts"] = 6
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    changed = study(tmp_path, "--report")
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    # carried seeds are checked by the config they keep, a record as its run directory was
    assert "carried.json was trained with another config than the study file's row 'unipool'" in changed.stderr
    assert "model.num_experts: run 8, study 6" in changed.stderr
    (tmp_path / "kept" / "carried.json").unlink()
    changed = study(tmp_path, "--jobs", "2")  # refused before anything trains
    assert changed.returncode != 0 and "trained in" not in changed.stdout
    assert "unipool-s1.json was trained with another config" in changed.stderr


def test_study_bad_input(tmp_path):
    (tmp_path / "study.yaml").write_text("seeds: [0]\n")
    r = study(tmp_path)
    assert r.returncode != 0 and "no 'base' section" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "study.py"), str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "study file not found" in r.stderr
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"seeds": [0], "base": {}, "variants": {"a": {}},
                                                          "contrasts": {"a vs b": ["a", "b"]}}))
    r = study(tmp_path, "--plan")
    assert r.returncode != 0 and "contrast 'a vs b' must be [variant, variant]" in r.stderr
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"seeds": [0], "base": {}, "variants": {"a": {}},
                                                          "read_contrasts": {"a vs a": ["a"]}}))
    r = study(tmp_path, "--plan")
    assert r.returncode != 0 and "read_contrasts entry 'a vs a' must be [variant, variant]" in r.stderr


@pytest.mark.parametrize("name, runs, tokens", [("cpu2.yaml", 32, "3,276,800"), ("gpu.yaml", 42, "2,000,158,720"),
                                                ("family.yaml", 104, "3,276,800"),
                                                ("family-gpu.yaml", 39, "2,000,158,720")])
def test_plan_checks_every_run_of_the_study_files(name, runs, tokens, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "study.py"), str(ROOT / "experiments" / name),
                        "--plan", "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    # the runs finished elsewhere are the committed ones: its records and carried seeds (found from any directory)
    spec = yaml.safe_load((ROOT / "experiments" / name).read_text())
    kept = ROOT / "experiments" / spec["results_dir"] if spec.get("results_dir") else tmp_path / "none"
    done = len(list((kept / "runs").glob("*.json")))
    if (kept / "carried.json").is_file():
        done += sum(len(row["val_losses"]) for row in json.loads((kept / "carried.json").read_text())["rows"])
    counts = [f"{done} done"] * bool(done) + [f"{runs - done} new"] * bool(runs - done)  # states with no run unsaid
    assert lines[-1] == f"{runs} runs: " + ", ".join(counts)
    assert name != "family.yaml" or done >= 77
    assert all(f"{tokens} tokens" in line for line in lines[:-1])
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_smoke_steps_replace_the_token_budget_and_the_report_expects_them(tmp_path):
    """`--steps N` on a study whose base counts tokens (gpu.yaml) is a budget of N steps, and a smoke run's
    config is what the report compares it with (not the full study's)."""
    import dataclasses

    sys.path.insert(0, str(ROOT / "experiments"))
    from study import config_drift, load_study, run_config

    from unipool.config import run_config_from_dict

    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "study.py"), str(ROOT / "experiments" / "gpu.yaml"),
                        "--plan", "--steps", "20", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    study = load_study(ROOT / "experiments" / "family.yaml")
    run_dir = tmp_path / "vanilla-s0"
    run_dir.mkdir()
    cfg = dataclasses.asdict(run_config_from_dict(run_config(study, "vanilla", 0, 20)))
    (run_dir / "config.json").write_text(json.dumps(cfg))
    assert config_drift(study, "vanilla", 0, run_dir, steps=20) == []
    assert "train.steps: run 20, study 800" in config_drift(study, "vanilla", 0, run_dir)


def test_plan_names_a_bad_field(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "seeds": [0], "base": {"model": {}, "train": {"steps": 2}},
        "variants": {"bad": {"norm_router_c": "match_gate:-1"}}}))
    r = study(tmp_path, "--plan")
    assert r.returncode != 0 and "model.norm_router_c" in r.stderr and "Traceback" not in r.stderr


def test_paired_confidence_interval_by_hand():
    sys.path.insert(0, str(ROOT / "experiments"))
    from study import ci95

    se, lo, hi = ci95([-0.1, -0.3, -0.2, -0.2])  # mean -0.2, sd sqrt(0.02/3), t(3) = 3.182
    sd = (0.02 / 3) ** 0.5
    assert se == pytest.approx(sd / 2)
    assert (lo, hi) == pytest.approx((-0.2 - 3.182 * sd / 2, -0.2 + 3.182 * sd / 2))
    assert ci95([0.1]) is None


def test_depth_usage_places_each_pool_and_orders_experts_by_depth():
    sys.path.insert(0, str(ROOT / "experiments"))
    from study import depth_usage

    # 4 layers tied in pairs (2 pools of 2 experts): layer 0 uses only expert 1 of pool 0, layer 1 both
    # evenly, layers 2-3 only expert 0 of pool 1; expert 1 of pool 1 is never picked
    stats = {"n_pools": 2, "pool_of_layer": [0, 0, 1, 1],
             "usage_LE": [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]}
    full = depth_usage(stats)
    # columns by mean depth: pool 0's expert 1 (depth 1/3), pool 0's expert 0 (depth 1), pool 1's expert 0
    # (depth 2.5), the unused expert last
    assert full.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


def test_stopping_rule_decides_once_per_seed(tmp_path):
    """The rule (`stop_when_se`) is met once every paired SE is <= se over >= min_seeds seeds; the decision
    is taken at a seed's first run and holds for the whole seed, so no seed is run by only some variants."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import dataclasses

    from study import SeedGate, run_config, stopping_line, stopping_state

    from unipool.config import run_config_from_dict

    study = {"seeds": [10, 11, 12, 13, 14], "stop_when_se": {"se": 0.02, "min_seeds": 3}, "base": {},
             "variants": {"vanilla": {}, "unipool": {}}, "contrasts": {}}

    def finish(variant: str, seed: int, loss: float) -> None:
        run_dir = tmp_path / f"{variant}-s{seed}"
        run_dir.mkdir()
        # the rule counts what the report would: runs whose config is their row's
        config = dataclasses.asdict(run_config_from_dict(run_config(study, variant, seed, None)))
        (run_dir / "config.json").write_text(json.dumps(config))
        (run_dir / "summary.json").write_text(json.dumps({"val_loss": loss}))

    for seed, delta in zip((10, 11), (-0.10, -0.11)):
        finish("vanilla", seed, 4.0)
        finish("unipool", seed, 4.0 + delta)
    state = stopping_state(study, tmp_path)
    assert not state["met"] and state["seeds"] == 2  # SE 0.005, but 2 seeds < min_seeds
    assert SeedGate(study, tmp_path).skip_reason(12) == ""
    finish("vanilla", 12, 4.0)
    finish("unipool", 12, 3.88)  # deltas -0.10, -0.11, -0.12: sd 0.01, SE 0.0058 <= 0.02
    state = stopping_state(study, tmp_path)
    assert state["met"] and state["seeds"] == 3 and state["worst"][1] == pytest.approx(0.01 / 3 ** 0.5)
    assert "Stopping rule met" in stopping_line(state)
    gate = SeedGate(study, tmp_path)
    assert gate.skip_reason(13).startswith("Stopping rule met")  # the 4th seed is not needed

    # a wide spread: seed 13 is needed, and stays needed for every variant even once a run of it has moved
    # the rule (here vanilla-s13 and unipool-s13 finish and bring the SE under 0.02)
    study["stop_when_se"]["se"] = 0.001
    gate = SeedGate(study, tmp_path)
    assert gate.skip_reason(13) == ""
    study["stop_when_se"]["se"] = 0.02
    finish("vanilla", 13, 4.0)
    assert gate.skip_reason(13) == ""  # decided at the seed's first run
    # seed 14's first run starts while unipool-s13 still trains (--jobs 2): the rule is met on seeds 10-12,
    # but not on every seed before 14, so seed 14 runs rather than the study stopping a seed early
    assert SeedGate(study, tmp_path).skip_reason(14) == ""
    finish("unipool", 13, 3.87)
    assert SeedGate(study, tmp_path).skip_reason(14).startswith("Stopping rule met")


def test_one_seed_shows_no_spread():
    sys.path.insert(0, str(ROOT / "experiments"))
    from study import fmt, mean_std, seeds_for_se

    assert mean_std([4.2]) == (4.2, None) and fmt(mean_std([4.2])) == "4.2000 (1 seed)"
    assert fmt(mean_std([4.0, 4.2])) == f"4.1000 ± {0.2 / 2 ** 0.5:.4f}"
    assert seeds_for_se([0.1, 0.1001], 0.02, min_seeds=3) == 3  # tiny spread: never below the rule's minimum
    assert seeds_for_se([0.0, 0.2], 0.02) == 50  # sd 0.1414: (0.1414 / 0.02)^2 = 50


def test_pooled_moments_equal_the_moments_of_every_value():
    """carried.json keeps only the [mean, sd] of earlier seeds' routing statistics: pooled with new values they
    give the mean and SD of all the values."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from study import mean_std, pooled

    xs = [0.31, 0.12, 0.55, 0.47, 0.08, 0.29, 0.9]
    for split in range(1, len(xs)):
        assert pooled(xs[split:], list(mean_std(xs[:split])), split) == pytest.approx(mean_std(xs))
    assert pooled([], [0.4, None], 1) == (0.4, None)  # one carried seed, none recorded
    assert pooled([0.6], [0.4, None], 1) == pytest.approx((0.5, 0.2 / 2 ** 0.5))
    assert pooled([0.2, 0.4]) == mean_std([0.2, 0.4]) and pooled([]) is None


def test_healing_refuses_a_finished_run_of_other_settings(tmp_path):
    """experiments/healing.py reuses finished runs so it resumes; one trained with another --steps, --lr or
    seed would otherwise be reported under this command's settings."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from healing import reuse_drift, train

    run_dir = tmp_path / "healed-s0"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"train": {"steps": 200, "lr": 5e-4, "min_lr": 5e-5, "seed": 0}}))
    (run_dir / "summary.json").write_text(json.dumps({"val_loss": 4.0}))
    same = {"train.steps": 200, "train.lr": 5e-4, "train.min_lr": 5e-4 / 10, "train.seed": 0}
    assert reuse_drift(run_dir, same) == []
    assert reuse_drift(run_dir, {**same, "train.steps": 300}) == ["train.steps: run 200, now 300"]
    assert train(tmp_path, "healed-s0", want=same) == run_dir  # reused: nothing is trained
    with pytest.raises(SystemExit, match=r"healed-s0 finished with other settings \(train.seed: run 0, now 1\)"):
        train(tmp_path, "healed-s0", want={**same, "train.seed": 1})


def test_a_relative_results_dir_is_relative_to_the_study_file(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from study import load_study, records_dir, results_path

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.yaml").write_text(yaml.safe_dump({"base": {}, "variants": {}, "seeds": [0],
                                                              "results_dir": "res/x"}))
    study = load_study(tmp_path / "sub" / "s.yaml")
    assert results_path(study) == tmp_path / "sub" / "res" / "x"
    assert records_dir(study) == tmp_path / "sub" / "res" / "x" / "runs" and records_dir(study, steps=2) is None
    family = load_study(ROOT / "experiments" / "family.yaml")
    assert results_path(family) == ROOT / "experiments" / "results" / "family"
