"""The command line of every trainer, built from its `Args` dataclass.

Each field, declared with `arg(default, help, min=..., choices=...)`, becomes a flag
(`total_steps` -> `--total-steps`) whose help is `help` followed by its default; a field with
`choices` lists them and rejects anything else, one with `min` rejects smaller values, and a float
field rejects nan and inf. transformers' `HfArgumentParser` does the dataclass part too, but not the rest of what a
trainer needs, so this helper stays:
- tri-state switches (`bool | None`, default "decide at run time") as `--x` / `--no-x`;
  HfArgumentParser turns them into flags that demand a value;
- `--resume RUN_DIR` continues with the run's saved arguments, overridden only by the flags
  typed again, which needs to know which flags were typed, not just their values;
- every mistake is one line (a `UsageError`), not argparse's usage block and exit.
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

from common import UsageError


def arg(default, help: str, *, min: int | None = None, choices: tuple[str, ...] | None = None):
    """One field of a trainer's `Args`: its default, its --help line, and what the command line accepts
    (`min`: the smallest value; `choices`: the only values)."""
    metadata = {"help": help}
    if min is not None:
        metadata["min"] = min
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _build_parser(args_class, description: str, with_defaults: bool) -> argparse.ArgumentParser:
    parser = _OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            argument_default=None if with_defaults else argparse.SUPPRESS)
    for field in dataclasses.fields(args_class):
        flag = "--" + field.name.replace("_", "-")
        default = {"default": field.default} if with_defaults else {}
        help_text = field.metadata["help"]
        if "default" not in help_text:  # a None default is explained in the help text itself
            shown = "none" if field.default is None else ("on" if field.default else "off") if field.type is bool else field.default
            help_text += f" (default: {shown})"
        if field.type in (bool, bool | None):
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, **default)
            action.help = help_text  # set afterwards: some Pythons' BooleanOptionalAction append a default of their own
            continue
        value_type = int if field.type in (int, int | None) else float if field.type in (float, float | None) else str
        choices = field.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else None
        parser.add_argument(flag, type=value_type, metavar=metavar, help=help_text, **default)
    return parser


def parse_args(args_class, argv=None, description: str = ""):
    """An `args_class` instance from the command line (`argv`, default sys.argv[1:]).

    With --resume RUN_DIR, the arguments come from RUN_DIR/args.json, and only the flags given
    on this command line override them. Raises `UsageError` with one line on any mistake.
    """
    args = args_class(**vars(_build_parser(args_class, description, with_defaults=True).parse_args(argv)))
    if getattr(args, "resume", None) is not None:
        saved = Path(args.resume) / "args.json"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume}: not a run folder (no args.json in it)")
        typed = vars(_build_parser(args_class, description, with_defaults=False).parse_args(argv))
        args = args_class(**{**json.loads(saved.read_text()), **typed})
    for field in dataclasses.fields(args_class):
        choices, value = field.metadata.get("choices"), getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):  # float("nan") parses, then breaks AdamW or a loss
            raise UsageError(f"--{field.name.replace('_', '-')} must be a finite number (got {value})")
        if choices and value is not None and value not in choices:
            raise UsageError(f"--{field.name.replace('_', '-')} must be one of {', '.join(choices)} (got {value!r})")
        low = field.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise UsageError(f"--{field.name.replace('_', '-')} must be {'positive' if low == 1 else f'{low} or more'} (got {value})")
    return args
