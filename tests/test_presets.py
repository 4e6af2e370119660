"""`unipool presets`: every preset listed with its parameter counts, and the README's table is its output."""

import json
from pathlib import Path

from unipool.analysis.params import param_report
from unipool.analysis.presets import markdown, preset_rows
from unipool.cli import main
from unipool.presets import PRESETS, get_preset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_preset_is_listed_with_its_counts(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PRESETS)
    by_name = {r["name"]: r for r in rows}
    for name in ("unipool-182m", "vanilla-469m", "demo", "debug"):
        report = param_report(get_preset(name))
        assert (by_name[name]["total"], by_name[name]["active"]) == (report["total"], report["active"])
    assert round(by_name["unipool-182m"]["total"] / 1e6, 1) == 777.9  # the paper's total at 182M
    assert by_name["demo"]["meant_for"].startswith("CPU") and by_name["demo"]["steps"] == 720
    assert by_name["demo"]["data"] == "Shakespeare, bpe:4096"


def test_readme_table_is_the_commands_output():
    text = README.read_text()
    table = text.split("<!-- presets:begin -->\n", 1)[1].split("\n<!-- presets:end -->", 1)[0]
    assert table == markdown(preset_rows()), "README's preset table is stale: paste `unipool presets` into it"
