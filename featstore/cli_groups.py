"""`featstore build` with several models: which options belong to which model.

`--model A --store a.zarr --model B --size 518 --store b.zarr` builds A into a.zarr and
B (at 518) into b.zarr from one read and decode of each image. The command line is read
in order: each `--model` (or `--preset`) starts a model, and the per-model options
after it (`PER_MODEL`) are that model's, up to the next one; the other options are the
build's, given once, anywhere. A `--preset` after a `--model` (or a `--model` after a
`--preset`) with no output between is the same model: a preset with other weights.
With one model, options before its `--model` are its own, as they always were.

click keeps only the last value of a repeated option, so the command records the raw
arguments (`GroupedCommand`) and this module reads the groups from them, converting
each value with the option's own click type. With one model the command line means
what it always did; anything ambiguous is refused in one line before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import typer.core

from featstore.errors import ConfigError

ARGV = "featstore.argv"  # where GroupedCommand keeps the raw arguments (ctx.meta)
STARTS = ("model", "preset")  # a new model
OUTPUTS = ("store", "npy_dir")
PER_MODEL = (*STARTS, *OUTPUTS, "size", "precision", "fp16", "clip_output", "layers", "norm", "embedding", "resizer")


class GroupedCommand(typer.core.TyperCommand):
    """A typer command that keeps its raw arguments for `model_groups`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[ARGV] = list(args)
        return super().parse_args(ctx, args)


@dataclass(slots=True)
class ModelArgs:
    """One model's options as given: {parameter name: value}, and how they were spelled."""

    values: dict[str, Any] = field(default_factory=dict)
    spelled: dict[str, str] = field(default_factory=dict)  # parameter name -> the option as typed

    @property
    def name(self) -> str:
        for p in STARTS:
            if p in self.values:
                return f"{self.spelled[p]} {self.values[p]}"
        return "the model"

    def has_start(self) -> bool:
        return any(p in self.values for p in STARTS)

    def has_output(self) -> bool:
        return any(p in self.values for p in OUTPUTS)


def _options(ctx: Any) -> dict[str, tuple[Any, Any]]:
    """Every spelling of the command's options -> (click parameter, flag value or None)."""
    out: dict[str, tuple[Any, Any]] = {}
    for param in ctx.command.params:
        for opt in getattr(param, "opts", ()):
            out[opt] = (param, True if getattr(param, "is_flag", False) else None)
        for opt in getattr(param, "secondary_opts", ()):
            out[opt] = (param, False)
    return out


def _occurrences(ctx: Any, argv: list[str]) -> list[tuple[str, str, Any]]:
    """(parameter name, spelling, raw value) of each per-model option, in command-line order."""
    options = _options(ctx)
    found: list[tuple[str, str, Any]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            continue
        if token.startswith("--"):
            spelled, eq, value = token.partition("=")
        else:  # -m VALUE or -mVALUE
            spelled, value = token[:2], token[2:]
            eq = "=" if value else ""
        if spelled not in options:
            continue  # click reports unknown options itself
        param, flag = options[spelled]
        if flag is None and not eq:
            value = argv[i] if i < len(argv) else ""
            i += 1
        if param.name in PER_MODEL:
            found.append((param.name, spelled, flag if flag is not None else param.process_value(ctx, value)))
    return found


def model_groups(ctx: Any) -> list[ModelArgs]:
    """The per-model options of each model of the command line, in order (one entry for a
    command line of one model, also when it gives no --model). ConfigError (one line) for
    an ambiguous command line."""
    groups = [ModelArgs()]
    for name, spelled, value in _occurrences(ctx, ctx.meta.get(ARGV, [])):
        cur = groups[-1]
        if name in STARTS and (name in cur.values or (cur.has_start() and cur.has_output())):
            groups.append(cur := ModelArgs())
        if name in cur.values:
            raise ConfigError(f"{spelled} is given twice for {cur.name}: each model takes it once")
        cur.values[name], cur.spelled[name] = value, spelled
    if len(groups) == 1:
        return groups
    first = groups[0]
    for name in first.values:  # given before the first model: whose is it?
        if name in STARTS:
            break
        raise ConfigError(
            f"{first.spelled[name]} comes before the first --model: with several models, give it after the "
            "--model it is for"
        )
    for g in groups:
        if not g.has_output():
            raise ConfigError(
                f"{g.name} has no output: give each model its own --store or --npy-dir after it "
                "(two models cannot share one store)"
            )
    return groups
