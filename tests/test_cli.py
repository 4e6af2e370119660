"""The command table builds every command, and the flag surface matches tests/cli_surface.json.

The snapshot holds, per command, every option's strings, destination, nargs, choices, default and
whether it is required; not the help prose. When a flag changes on purpose, regenerate it with

    UNIPOOL_UPDATE_CLI_SNAPSHOT=1 python -m pytest tests/test_cli.py

and commit the diff of tests/cli_surface.json with the change.
"""

import argparse
import json
import os
from pathlib import Path

import pytest

from unipool import cli

SNAPSHOT = Path(__file__).parent / "cli_surface.json"


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def surface(parser: argparse.ArgumentParser) -> dict:
    """{command: {option or positional: {dest, nargs, choices, default, required}}}."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        flags = {}
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            key = " ".join(action.option_strings) or action.dest
            flags[key] = {"dest": action.dest, "nargs": _jsonable(action.nargs),
                          "choices": _jsonable(list(action.choices) if action.choices else None),
                          "default": _jsonable(None if action.default is argparse.SUPPRESS else action.default),
                          "required": action.required}
        out[name] = flags
    return out


def test_every_command_builds_and_helps(capsys):
    names = [c.name for c in cli.COMMANDS]
    assert len(names) == len(set(names))
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert f"usage: unipool {name}" in capsys.readouterr().out


def test_flag_surface_matches_the_snapshot():
    current = surface(cli.build_parser())
    if os.environ.get("UNIPOOL_UPDATE_CLI_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    saved = json.loads(SNAPSHOT.read_text())
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current or name not in saved:
            problems.append(f"command {name!r} {'removed' if name not in current else 'added'}")
            continue
        old, new = saved[name], current[name]
        for flag in sorted(set(old) | set(new)):
            if old.get(flag) != new.get(flag):
                problems.append(f"{name} {flag}: {old.get(flag)} -> {new.get(flag)}")
    assert not problems, ("the command-line surface changed (regenerate with UNIPOOL_UPDATE_CLI_SNAPSHOT=1 "
                          "python -m pytest tests/test_cli.py if that is intended):\n  " + "\n  ".join(problems))


def test_a_command_whose_code_fails_to_import_fails_loudly():
    def add_args(parser):
        import unipool_command_that_does_not_exist  # noqa: F401

    broken = cli.Command("broken", "a command whose module cannot be imported", add_args, lambda args: 0)
    with pytest.raises(ModuleNotFoundError, match="unipool_command_that_does_not_exist"):
        cli.build_parser([*cli.COMMANDS, broken])


def test_no_command_prints_the_overview(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(c.name in out for c in cli.COMMANDS)
