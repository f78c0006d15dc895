"""A check every fp8kit command line shares: `--help` gives each option its meaning and its default."""

from __future__ import annotations

import argparse


def undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """Options (and positionals) whose help is missing or too short to say what they mean, options whose help
    does not say what happens when they are not given ("default"), and options whose help does not show
    their default value."""
    problems = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        text = action.help or ""
        if len(text) < 15:
            problems.append(f"{name}: no meaning given")
        elif action.option_strings and not action.required and "default" not in text.lower():
            problems.append(f"{name}: no default given")
        elif action.option_strings and action.default not in (None, False):
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
            if shown not in text:
                problems.append(f"{name}: help does not show the default {shown!r}")
    return problems
