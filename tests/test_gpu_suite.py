"""bench/gpu_suite.py --cpu-smoke: every section of the GPU check runs (tiny shapes, CPU), so the suite
cannot rot between the rare runs on a GPU. The pieces that only matter on a GPU (memory estimates, an
out-of-memory in one row, the fp32 sync property, a leak, SIGTERM) are checked here on the CPU too."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_suite.py"
SECTIONS = ["environment", "dispatch_vs_reference", "fused_wgrad_vs_plain", "no_host_syncs", "compile_block",
            "loss_and_resume", "moe_layer", "train_step", "microbatch_sweep", "pool_wgrad_830m", "reduced_pools",
            "real_run", "compiled_step", "family_cost", "prepare_scaling"]


@pytest.fixture(scope="module")
def gs():
    """The suite as a module (it puts bench/ on sys.path for its helpers)."""
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smoke_suite(gs, tmp_path):
    return gs.Suite(tmp_path, tmp_path, 600, True, torch.device("cpu"))


def test_gpu_suite_cpu_smoke(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out),
                          "--work", str(work), "--budget-s", "600"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == SECTIONS
    for name, rec in sections.items():
        assert rec["status"] in ("ok", "skipped"), (name, rec.get("error"), rec.get("traceback"))
        assert rec.get("ok", True), (name, rec)
        assert rec["estimate_s"] > 0 and rec["seconds"] >= 0, (name, rec)
    # the GPU estimates fit --budget-s 480 on an H200 (the budget the recipe in the GPU notes uses)
    assert 0 < results["estimated_total_s"] <= 480
    assert sections["no_host_syncs"]["status"] == "skipped" and "CUDA" in sections["no_host_syncs"]["reason"]
    assert sections["environment"]["gemm_tflops"] > 0 and sections["environment"]["copy_gbps"] > 0
    assert sections["loss_and_resume"]["resume_max_abs_diff"] == 0.0  # exact on CPU
    assert sections["compile_block"]["graph_dtype"] == "float32"  # the dtype the compiled block runs in here
    assert {r["mode"] for r in sections["train_step"]["rows"]} == {"vanilla", "naive", "fused"}
    assert [r["mode"] for r in sections["compiled_step"]["rows"]] == ["naive", "fused"]
    assert all(r["vs_eager_fused"] > 0 for r in sections["compiled_step"]["rows"])
    family = sections["family_cost"]["rows"]  # one design per relative, from the study file, vanilla first
    assert [r["design"] for r in family] == ["vanilla", "unipool", "cs-moe-k2", "tie-g2-e16", "unipool-depth",
                                             "rexmoe-r4"]
    assert family[0]["vs_vanilla"] == 1.0 and all(r["vs_vanilla"] > 0 and r["status"] == "ok" for r in family)
    # memory after every step and its growth, for every path of train_step and compiled_step
    for r in sections["train_step"]["rows"] + sections["compiled_step"]["rows"]:
        assert r["ok"] is True and r["status"] == "ok", r
        assert r["mem_unit"] == "tensors" and len(r["mem_trace"]) == r["steps"] >= 6, r
        assert r["mem_growth_per_step"] is not None and r["mem_growth_per_step"] <= r["mem_growth_bound"], r
        assert r["mem_estimate_gb"] > 0 and r["free_gb"] > r["mem_estimate_gb"], r
    assert len(sections["real_run"]["runs"]) == 2 and (out / "curves.png").is_file()
    scaling = sections["prepare_scaling"]
    assert [r["workers"] for r in scaling["rows"]] == [1, 2] and scaling["limit_tok_per_s"] > 0
    assert scaling["rows"][0]["efficiency"] == 1.0 and all(r["tok_per_s"] > 0 for r in scaling["rows"])
    md = (out / "results.md").read_text()
    assert "| section | status | estimated s | actual s |" in md and "## MoE layer" in md and "## Real run" in md
    assert "growth/step" in md and "tensors | PASS |" in md and "## The sharing family at 182m" in md
    # what comes back from the GPU machine: a few small files (no temporary files left by the atomic
    # writes), the runs stay in the scratch folder and their checkpoints are deleted
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.json", "results.md"]
    assert not list(work.rglob("checkpoints")) and not list(work.rglob("*.safetensors"))

    # a budget that fits nothing but the first section skips the rest and says why
    small = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out",
                            str(tmp_path / "small"), "--work", str(work), "--budget-s", "0.5"],
                           capture_output=True, text=True, timeout=300)
    assert small.returncode == 0, small.stderr[-2000:]
    skipped = json.loads((tmp_path / "small" / "results.json").read_text())["sections"]
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in skipped.values())


def test_sigterm_stops_the_suite_and_keeps_results(tmp_path):
    """SIGTERM mid-section: that section is recorded as interrupted, results are written, nothing after it
    runs, and the suite exits, also when the signal lands in a training run (which catches SIGTERM)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work",
                             str(tmp_path / "work"), "--only", "environment,loss_and_resume,moe_layer,train_step"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("[loss_and_resume] ..."):
                break
        time.sleep(1.5)  # into the training run
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    results = json.loads((out / "results.json").read_text())
    names = list(results["sections"])
    assert names[0] == "environment" and results["sections"]["environment"]["status"] == "ok"
    assert results["sections"][names[-1]]["status"] == "interrupted", results["sections"]
    assert "train_step" not in names
    assert results["interrupted"]["signal"] == "SIGTERM" and results["interrupted"]["section"] == names[-1]
    assert "Interrupted" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]


@pytest.mark.parametrize("summary", [{"interrupted": True, "signal": "SIGTERM"},
                                     {"interrupted": False, "signal": "SIGTERM"}], ids=["mid-run", "last-step"])
def test_training_run_caught_sigterm_stops_the_suite(gs, tmp_path, monkeypatch, summary):
    """The training loop catches SIGTERM (saves, returns interrupted, or completes when it landed in the
    last step, naming the signal): the suite must still stop."""
    import unipool.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg, resume=None: summary)
    monkeypatch.setattr(gs, "_stopping", False)
    with pytest.raises(gs.Interrupted):
        gs.training_run(smoke_suite(gs, tmp_path), preset="debug", steps=2, batch=2, seq=16, tokenizer="bpe:512",
                        name="x")
    assert not (tmp_path / "runs" / "x").exists()


def test_memory_estimate_skips_the_plain_pool_gradient_at_469m(gs):
    """At 469m (24 layers, M = 192) the plain pool gradient holds one bf16 pool copy per layer, ~116 GB:
    more than an H200 has; the fused one fits an H200."""
    from unipool.presets import get_preset

    cfg = get_preset("unipool-469m").replace(norm_router_c="one")
    naive = gs.estimate_step_gb(cfg, "naive", 16, 1024, autocast=True)
    fused = gs.estimate_step_gb(cfg, "fused", 16, 1024, autocast=True)
    assert 110 < naive["bf16_copies"] < 125 and naive["total"] > 139 * 2**30 / 1e9
    assert fused["bf16_copies"] < 6 and fused["total"] < 139 * 2**30 / 1e9
    # with activation checkpointing the layers' copies are recomputed, not kept
    assert gs.estimate_step_gb(cfg, "naive", 16, 1024, autocast=True, checkpointing=True)["bf16_copies"] < 6
    # no bf16 copies in fp32 (the CPU smoke)
    assert gs.estimate_step_gb(cfg, "naive", 16, 1024, autocast=False)["bf16_copies"] == 0


def test_case_that_cannot_fit_is_skipped_with_its_estimate(gs, tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "free_gb", lambda device: 0.01)
    row = gs.step_case(smoke_suite(gs, tmp_path), "debug", "naive", 2, 32)
    assert row["status"] == "skipped" and "memory" in row["reason"] and row["mem_estimate_gb"] > 0.01
    assert "ok" not in row and gs.rows_ok([row])


def test_oom_in_one_row_keeps_the_others(gs, tmp_path, monkeypatch):
    run_steps = gs._run_steps

    def oom_for_naive(suite, cfg, mode, *args):
        if mode == "naive":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 116.00 GiB")
        return run_steps(suite, cfg, mode, *args)

    monkeypatch.setattr(gs, "_run_steps", oom_for_naive)
    suite = smoke_suite(gs, tmp_path)
    rec = {}
    gs.train_step_speed(suite, rec)
    rows = {r["mode"]: r for r in rec["rows"]}
    assert list(rows) == ["vanilla", "naive", "fused"]
    assert rows["naive"]["status"] == "oom" and rows["naive"]["ok"] is False
    assert "out of memory" in rows["naive"]["error"] and rows["naive"]["vs_vanilla"] is None
    assert rows["vanilla"]["ok"] and rows["fused"]["ok"] and rows["fused"]["tok_per_s"] > 0
    assert rec["ok"] is False
    suite.results["sections"]["train_step"] = rec
    md = gs.markdown(suite.results)
    assert "| debug | naive |" in md and "oom: OutOfMemoryError" in md


def test_memory_growth_marks_the_row_fail(gs, tmp_path, monkeypatch):
    """A step that leaves one tensor alive per step (as the fused path once left a bf16 pool copy)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_step

    make_step, kept = train_step.make_step, []

    def leaky(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def run():
            step()
            kept.append(torch.zeros(4))
        return run

    monkeypatch.setattr(train_step, "make_step", leaky)
    row = gs.step_case(smoke_suite(gs, tmp_path), "debug", "fused", 2, 32, warmup=1, repeats=5, memory_check=True)
    assert row["ok"] is False and row["status"] == "failed", row
    assert row["mem_growth_per_step"] == pytest.approx(1.0) and "memory grows" in row["error"]


def test_host_sync_check_is_bf16_first_and_fp32_syncs_are_expected(gs):
    order = []

    def run_one(dtype):
        order.append(dtype)
        if dtype == torch.float32:
            raise RuntimeError("called a synchronizing CUDA operation")

    assert gs.sync_checks(run_one) == {"bfloat16": "no host sync", "float32": gs.SYNC_EXPECTED_FP32}
    assert order == [torch.bfloat16, torch.float32]

    def bf16_syncs(dtype):
        raise RuntimeError("called a synchronizing CUDA operation")

    result = gs.sync_checks(bf16_syncs)
    assert result["bfloat16"].startswith("FAIL") and result["float32"] == gs.SYNC_EXPECTED_FP32


def test_markdown_survives_missing_figures(gs):
    none_row = {"preset": "unipool-469m", "mode": "naive", "tokens": 16384, "tok_per_s": None, "mfu": None,
                "mfu_spec": None, "peak_gb": None, "status": "skipped", "reason": "memory: ~209 GB estimated"}
    results = {"mode": "gpu", "budget_s": 420, "estimated_total_s": 406, "sections": {
        "environment": {"status": "failed", "error": "x"},
        "moe_layer": {"rows": [{"label": "x", "d": 1, "f": 1, "E": 8, "k": 1, "ours": None, "dense": 1.0}]},
        "train_step": {"rows": [none_row, {"preset": "p", "mode": "fused"}]},
        "compiled_step": {"rows": [{"mode": "naive", "status": "oom", "ok": False, "error": "OutOfMemoryError: x"}]},
        "microbatch_sweep": {"rows": [{"tokens": 4096, "errors": {"naive": "oom"}}]},
        "real_run": {"runs": {"a": {"status": "failed", "ok": False, "error": "E"}}}}}
    md = gs.markdown(results)
    assert "skipped: memory: ~209 GB" in md and "oom: OutOfMemoryError" in md and "FAIL: E" in md
