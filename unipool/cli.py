"""`unipool` command line: one subcommand per task, each a plain pair of functions in its module.

A subcommand's module defines
    add_<name>_args(parser)   its flags (kebab-case, every flag with help=)
    cmd_<name>(args) -> int   runs it and returns the exit code
and `COMMANDS` below lists them all, by reference: a module that fails to import fails the command line
at start-up instead of hiding a command. User-facing failures raise UnipoolError and are printed as
one line, never as a traceback. tests/test_cli.py freezes the flag surface (tests/cli_surface.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from unipool import __version__
from unipool.analysis import compare, generate, params, presets, probe, report, routing
from unipool.analysis import eval as eval_
from unipool.data import prepare
from unipool.errors import UnipoolError, is_disk_full
from unipool.interop import convert, hf, lm_eval
from unipool.train import loop


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("train", "train a model (no arguments: the demo UniPool run on Shakespeare, CPU, minutes)",
            loop.add_train_args, loop.cmd_train),
    Command("prepare", "tokenize text into memory-mapped token shards with a validation split",
            prepare.add_prepare_args, prepare.cmd_prepare),
    Command("params", "total / active / expert parameter counts of a preset or config",
            params.add_params_args, params.cmd_params),
    Command("presets", "every preset: parameters, default data and steps, the hardware it is meant for",
            presets.add_presets_args, presets.cmd_presets),
    Command("eval", "validation loss and perplexity of a run or checkpoint", eval_.add_eval_args, eval_.cmd_eval),
    Command("compare", "table and loss-curve plots comparing runs", compare.add_compare_args, compare.cmd_compare),
    Command("report", "one picture of a run: loss curves, expert usage, dead rows, router scale (RUN/report.png)",
            report.add_report_args, report.cmd_report),
    Command("routing", "expert-utilisation analysis and plots of a run or checkpoint",
            routing.add_routing_args, routing.cmd_routing),
    Command("generate", "sample text from a run or checkpoint", generate.add_generate_args, generate.cmd_generate),
    Command("export", "export a run to a Hugging Face transformers directory", hf.add_export_args, hf.cmd_export),
    Command("import", "import a Mixtral / OLMoE / Qwen3-MoE checkpoint as a layerwise model",
            hf.add_import_args, hf.cmd_import),
    Command("convert", "a trained per-layer MoE into a shared pool (exact at step 0), merged, or a dense model upcycled",
            convert.add_convert_args, convert.cmd_convert),
    Command("lm-eval", "zero-shot evaluation with lm-evaluation-harness", lm_eval.add_lm_eval_args,
            lm_eval.cmd_lm_eval),
    Command("probe", "routing probe: replace learned routers with random routing", probe.add_probe_args,
            probe.cmd_probe),
]


def build_parser(commands: list[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unipool", description="Mixture-of-Experts LMs with a shared expert pool.")
    parser.add_argument("--version", action="version", version=f"unipool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_args(p)
        p.set_defaults(_cmd=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_cmd", None):
        parser.print_help()
        return 2
    try:
        return int(args._cmd(args) or 0)
    except UnipoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `unipool compare ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk wherever it strikes (run files, prepared data, exports, plots)
        if not is_disk_full(e):
            raise
        where = getattr(e, "filename", None)
        print(f"error: No space left on device{f' while writing {where}' if where else ''}: free some space and "
              "run the command again (a training run continues from its latest checkpoint with --resume)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
