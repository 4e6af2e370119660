"""Every command that needs an install extra fails in one line naming the install command, on a base install.

A base install is simulated in a child process: the extras' top-level modules are blocked
(`sys.modules[name] = None` makes every import of them raise ImportError, as on a machine without them).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_run

REPO = Path(__file__).resolve().parents[1]
BASE = """
import sys
for name in ("transformers", "lm_eval", "tensorboard", "datasets", "pyarrow", "zstandard"):
    sys.modules[name] = None
from unipool.cli import main
sys.exit(main(sys.argv[1:]))
"""


def base_install(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", BASE, *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, _ = make_run(tmp_path_factory.mktemp("extras") / "run")
    return root


def one_line(proc: subprocess.CompletedProcess, extra: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"pip install 'unipool[{extra}]'" in lines[0], lines[0]
    return lines[0]


def test_export_names_the_hf_extra(run, tmp_path):
    assert "unipool export" in one_line(base_install("export", str(run), "--hf", str(tmp_path / "hf")), "hf")


def test_import_of_a_family_model_names_the_hf_extra(tmp_path):
    hf = tmp_path / "mixtral"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    one_line(base_install("import", str(hf), "--out", str(tmp_path / "out")), "hf")


def test_lm_eval_names_the_eval_extra(run):
    one_line(base_install("lm-eval", str(run), "--tasks", "arc_easy"), "eval")


def test_probe_of_an_hf_model_names_the_hf_extra(tmp_path):
    hf = tmp_path / "olmoe"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    (tmp_path / "text.txt").write_text("some held-out text\n")
    one_line(base_install("probe", str(hf), "--data", str(tmp_path / "text.txt")), "hf")


def test_prepare_of_parquet_names_the_data_extra(tmp_path):
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    one_line(base_install("prepare", str(tmp_path / "docs.parquet"), "--out", str(tmp_path / "out"),
                          "--tokenizer", "gpt2"), "data")


def test_the_base_commands_run_without_extras(run):
    proc = base_install("eval", str(run), "--data", str(REPO / "README.md"), "--max-tokens", "64", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["tokens"] == 64
