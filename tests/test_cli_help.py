"""Every fp8kit command's `--help` gives each option its meaning and its default (tests/cli_help.py)."""

from __future__ import annotations

import importlib

import pytest

from cli_help import undocumented_options

COMMANDS = ["fp8kit.core.__main__", "fp8kit.core.models", "fp8kit.export.__main__", "fp8kit.bench.__main__"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_gives_every_option_a_meaning_and_its_default(module):
    parser = importlib.import_module(module).build_parser()
    assert undocumented_options(parser) == []


def test_the_check_catches_what_it_claims():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--a", help="what a does, with no word about its absence")
    parser.add_argument("--b", default=7, help="what b does (default: some)")
    parser.add_argument("--c", action="store_true")
    parser.add_argument("--d", required=True, help="a required option needs no default")
    assert undocumented_options(parser) == [
        "--a: no default given", "--b: help does not show the default '7'", "--c: no meaning given"
    ]
