"""`unipool` command line: one subcommand per task, each a plain function in its own module.

A subcommand NAME lives in module MODULE (table below) as two functions:
    add_NAME_args(parser)   declares its flags (kebab-case, every flag with help=)
    cmd_NAME(args) -> int   runs it and returns the exit code
User-facing failures raise UnipoolError and are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from unipool.errors import UnipoolError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("unipool.train.loop", "train a model (no arguments: the demo UniPool run on Shakespeare, CPU, minutes)"),
    "prepare": ("unipool.data.dataset", "tokenize text into memory-mapped token shards with a validation split"),
    "params": ("unipool.model.params", "total / active / expert parameter counts of a preset or config"),
    "eval": ("unipool.analysis.eval", "validation loss and perplexity of a run or checkpoint"),
    "compare": ("unipool.analysis.report", "table and loss-curve plots comparing runs"),
    "routing": ("unipool.analysis.routing", "expert-utilisation analysis and plots of a run or checkpoint"),
    "generate": ("unipool.analysis.generate", "sample text from a run or checkpoint"),
    "export": ("unipool.interop.hf", "export a run to a Hugging Face transformers directory"),
    "import": ("unipool.interop.hf", "import a Mixtral / OLMoE / Qwen3-MoE checkpoint as a layerwise model"),
    "lm-eval": ("unipool.interop.lm_eval", "zero-shot evaluation with lm-evaluation-harness"),
    "probe": ("unipool.analysis.probe", "routing probe: replace learned routers with random routing"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None  # command not built yet
        raise
    attr = name.replace("-", "_")
    add, cmd = getattr(module, f"add_{attr}_args", None), getattr(module, f"cmd_{attr}", None)
    return (add, cmd) if add and cmd else None


def build_parser() -> argparse.ArgumentParser:
    from unipool import __version__

    parser = argparse.ArgumentParser(prog="unipool", description="Mixture-of-Experts LMs with a shared expert pool.")
    parser.add_argument("--version", action="version", version=f"unipool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        loaded = _load(name)
        if loaded is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        loaded[0](p)
        p.set_defaults(_cmd=loaded[1])
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


if __name__ == "__main__":
    sys.exit(main())
