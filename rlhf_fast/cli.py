"""The ``rlhf-fast`` console script: ``rlhf-fast <command> [--config FILE.yaml] [key=value ...]``.

Commands live in a registry; adding one is one call, with no parser code to touch. The built-in
ones are registered at the bottom of this module (a new stage adds its line there, as strings, so
nothing heavy is imported until that command runs):

    register_stage_command("ppo", config_cls="rlhf_fast.trainer:PPOConfig", section="ppo",
                           run="rlhf_fast.stages.ppo:run_ppo_stage", help="PPO against a reward model")

A *stage command* reads the YAML ``section`` of ``--config``, applies ``key=value`` overrides
checked against the config dataclass (``rlhf_fast.stages.config.load_stage_config``) and calls
``run(config)``. Classes and functions may be given as ``"module:attr"`` strings, imported only when
that command runs, so ``rlhf-fast --help`` stays fast. Any other command registers with
``register_command(name, help, configure, run)``: ``configure(parser)`` adds its arguments and
``run(args)`` does the work. ``run`` returns an exit code (None = 0).

Configuration errors (unknown key, bad value, missing file, unfinished input stage, malformed
dataset) print one line ``rlhf-fast <command>: error: ...`` and exit with status 2, no traceback.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = ["register_command", "register_stage_command", "build_parser", "main", "COMMANDS"]


class Command(NamedTuple):
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]
    add_help: bool = True  # False when configure() adds its own -h/--help


COMMANDS: dict[str, Command] = {}


def _resolve(obj):
    """``"package.module:attr"`` -> the object; anything else as is."""
    if isinstance(obj, str):
        module, _, attr = obj.partition(":")
        if not attr:
            raise ValueError(f"expected 'module:attribute', got {obj!r}")
        return getattr(importlib.import_module(module), attr)
    return obj


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], Any] | str, replace: bool = False,
                     add_help: bool = True) -> None:
    """Add a subcommand. ``configure(parser)`` adds arguments; ``run(args) -> exit code | None``
    (or ``"module:fn"``)."""
    if name in COMMANDS and not replace:
        raise ValueError(f"command {name!r} is already registered (pass replace=True to override it)")
    COMMANDS[name] = Command(name, help, configure, lambda args: _resolve(run)(args), add_help)


class _ConfigHelpAction(argparse.Action):
    """``--help`` that also lists the config keys (imports the config class only when asked)."""

    def __init__(self, option_strings, dest, config_cls=None, section=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.config_cls = config_cls
        self.section = section

    def __call__(self, parser, namespace, values, option_string=None):
        from rlhf_fast.stages.config import describe_fields

        parser.print_help()
        cls = _resolve(self.config_cls)
        print(f"\nconfig keys (YAML section '{self.section}:' of --config, or key=value on the command line):")
        print(describe_fields(cls))
        parser.exit()


def register_stage_command(name: str, config_cls, section: str, run, help: str, replace: bool = False) -> None:
    """Add a stage subcommand: ``--config`` YAML section + ``key=value`` overrides -> ``run(config)``.

    config_cls: a dataclass or ``"module:Class"``; run: ``fn(config) -> exit code | None`` or ``"module:fn"``.
    """

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-h", "--help", action=_ConfigHelpAction, config_cls=config_cls, section=section,
                            help="show this help and the config keys, then exit")
        parser.add_argument("--config", metavar="FILE.yaml",
                            help=f"YAML file; its '{section}:' section sets this stage's config")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved config as YAML and exit without running")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="override a config key (repeatable), e.g. learning_rate=1e-4 max_steps=100")

    def run_stage(args: argparse.Namespace):
        import yaml

        from rlhf_fast.stages.config import config_to_dict, load_stage_config

        cls = _resolve(config_cls)
        cfg = load_stage_config(cls, args.config, section if args.config else None, args.overrides,
                                **_cpu_defaults(name, cls))
        if args.print_config:
            print(yaml.safe_dump({section: config_to_dict(cfg)}, sort_keys=False), end="")
            return 0
        return _resolve(run)(cfg)

    register_command(name, help, configure, run_stage, replace=replace, add_help=False)


def _cpu_defaults(command: str, cls) -> dict:
    """On a machine without CUDA, defaults for a TrainingArguments-style config that can run there
    (use_cpu=True, bf16=False; YAML and key=value still override them), said in one line."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if not {"use_cpu", "bf16"} <= names:
        return {}
    import torch

    if torch.cuda.is_available():
        return {}
    print(f"rlhf-fast {command}: no CUDA device: defaulting to use_cpu=true bf16=false (set them to override)",
          file=sys.stderr)
    return {"use_cpu": True, "bf16": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-fast",
        description="rlhf_fast: SFT, reward-model and RL stages with fused kernels. "
                    "Run `rlhf-fast <command> --help` for a command's options and config keys.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=cmd.add_help)
        cmd.configure(p)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from rlhf_fast.stages.config import ConfigError
    from rlhf_fast.stages.data import DatasetFormatError
    from rlhf_fast.stages.io import StageNotFinishedError, StageOutputError

    return ConfigError, DatasetFormatError, StageNotFinishedError, StageOutputError, FileNotFoundError


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        parser.error(f"unknown command {argv[0]!r}.{hint} Commands: {', '.join(COMMANDS)}")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = COMMANDS[args.command].run(args)
    except _user_errors() as e:
        print(f"rlhf-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


# --------------------------------------------------------------------------- built-in stages
register_stage_command(
    "sft", "rlhf_fast.stages.sft:SFTConfig", "sft", "rlhf_fast.stages.sft:run_sft_stage",
    help="supervised fine-tuning on (prompt, response) pairs (loss on response tokens only)",
)
register_stage_command(
    "rm", "rlhf_fast.stages.reward:RewardConfig", "rm", "rlhf_fast.stages.reward:run_rm_stage",
    help="reward-model training on (prompt, chosen, rejected) pairs (Bradley-Terry loss)",
)
register_stage_command(
    "dpo", "rlhf_fast.stages.dpo:DPOConfig", "dpo", "rlhf_fast.stages.dpo:run_dpo_stage",
    help="direct preference optimization on (prompt, chosen, rejected) pairs (no reward model, no RL loop)",
)



def _configure_pipeline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file with pipeline:, sft:, rm: and ppo: sections (e.g. configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="stage.key=value",
                        help="override one stage's key, e.g. ppo.kl_coef=0.1 sft.max_steps=50")


def run_pipeline_command(args) -> int:
    from rlhf_fast.stages.pipeline import run_pipeline

    run_pipeline(args.config, args.overrides)
    return 0


register_stage_command(
    "ppo", "rlhf_fast.trainer:PPOConfig", "ppo", "rlhf_fast.stages.ppo:run_ppo_stage",
    help="PPO against a reward model (policy from a finished SFT stage, reward from a finished RM stage)",
)
register_command("pipeline", "the whole RLHF pipeline: SFT -> reward model -> PPO -> report (make demo)",
                 _configure_pipeline, run_pipeline_command)
register_command("memory", "will PPO on this model fit on my GPUs? per-GPU bytes by component, four-model vs shared layout",
                 lambda parser: _resolve("rlhf_fast.memory.command:configure")(parser), "rlhf_fast.memory.command:run")
register_command("selfcheck", "check every fused op against its reference on this machine (CUDA: speed, "
                 "packing, a 0.5B PPO step); Markdown/JSON report, non-zero exit on a mismatch",
                 lambda parser: _resolve("rlhf_fast.selfcheck:configure")(parser), "rlhf_fast.selfcheck:run")


if __name__ == "__main__":
    sys.exit(main())
