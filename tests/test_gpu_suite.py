"""bench/gpu_suite.py --cpu-smoke: every section of the GPU check runs (tiny shapes, CPU), so the suite
cannot rot between the rare runs on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_cpu_smoke(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--cpu-smoke", "--out", str(out),
                          "--work", str(work), "--budget-s", "600"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == ["environment", "dispatch_vs_reference", "fused_wgrad_vs_plain", "no_host_syncs",
                              "compile_block", "loss_and_resume", "moe_layer", "train_step", "microbatch_sweep",
                              "pool_wgrad_830m", "reduced_pools", "real_run", "compiled_step"]
    for name, rec in sections.items():
        assert rec["status"] in ("ok", "skipped"), (name, rec.get("error"), rec.get("traceback"))
        assert rec.get("ok", True), (name, rec)
    assert sections["no_host_syncs"]["status"] == "skipped" and "CUDA" in sections["no_host_syncs"]["reason"]
    assert sections["environment"]["gemm_tflops"] > 0 and sections["environment"]["copy_gbps"] > 0
    assert sections["loss_and_resume"]["resume_max_abs_diff"] == 0.0  # exact on CPU
    assert {r["mode"] for r in sections["train_step"]["rows"]} == {"vanilla", "naive", "fused"}
    assert [r["mode"] for r in sections["compiled_step"]["rows"]] == ["naive", "fused"]
    assert all(r["vs_eager_fused"] > 0 for r in sections["compiled_step"]["rows"])
    assert len(sections["real_run"]["runs"]) == 2 and (out / "curves.png").is_file()
    md = (out / "results.md").read_text()
    assert "| section | status |" in md and "## MoE layer" in md and "## Real run" in md
    # what comes back from the GPU machine: a few small files, the runs stay in the scratch folder
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "results.json", "results.md"]

    # a budget that fits nothing but the first section skips the rest and says why
    small = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--cpu-smoke", "--out",
                            str(tmp_path / "small"), "--work", str(work), "--budget-s", "0.5"],
                           capture_output=True, text=True, timeout=300)
    assert small.returncode == 0, small.stderr[-2000:]
    skipped = json.loads((tmp_path / "small" / "results.json").read_text())["sections"]
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in skipped.values())
