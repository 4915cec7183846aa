"""docs/flags.md and the parsers agree, and every flag explains itself in --help.

Each entry point's table in docs/flags.md lists exactly its parser's flags (option strings) with the default that
--help shows: a flag added, removed or given another default without its row fails here. Every flag has a help
text, and --help shows its default.
"""
import argparse
import os
import re

import pytest

import bench
from flags import FlagParser, help_text, shown_default
import noise
import plots
import Pretrain_simclr
import report
import sweep
import Train_cifar
import Train_clothing1M
import Train_custom
import Train_webvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "flags.md")
# Every entry point and its parser, under the heading of its table in docs/flags.md.
ENTRY_POINTS = {
    "Train_cifar.py": Train_cifar.get_args_parser,
    "Train_clothing1M.py": Train_clothing1M.get_args_parser,
    "Train_webvision.py": Train_webvision.get_args_parser,
    "Train_custom.py": Train_custom.get_args_parser,
    "Pretrain_simclr.py": Pretrain_simclr.get_args_parser,
    "dataloader_cifar.py": noise.get_args_parser,
    "bench.py": bench.get_args_parser,
    "report.py": report.get_args_parser,
    "plots.py": plots.get_args_parser,
    "scripts/sweep_cifar.sh": sweep.build_parser,
}
# The sweep's --help is its usage text (sweep.USAGE), not argparse's: its actions carry no help of their own.
USAGE_HELP = {"scripts/sweep_cifar.sh": sweep.USAGE}
ROW = re.compile(r"^\|(.*)\|(.*)\|(.*)\|$")


def doc_tables():
    """{entry point: {frozenset of the flag's names: its default as the table writes it, backticks removed}}."""
    tables, current = {}, None
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                current = tables.setdefault(line[3:].strip(), {})
                continue
            row = ROW.match(line)
            if current is None or not row or not row.group(1).strip().startswith("`"):
                continue  # prose, a header or a separator line
            names = frozenset(re.findall(r"`([^`]+)`", row.group(1)))
            assert names not in current, f"docs/flags.md lists {sorted(names)} twice"
            current[names] = row.group(2).replace("`", "").strip()
    return tables


def documented(action):
    """The names docs/flags.md gives an action: its option strings, a positional's dest."""
    return frozenset(action.option_strings or [action.dest])


def parser_rows(entry):
    """{names: default --help shows} of an entry point's actions, --help itself left out. A positional that must
    be given shows `required`; None: described in words only (the sweep's defaults that are None or empty)."""
    rows = {}
    for action in ENTRY_POINTS[entry]()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings and action.nargs not in ("?", "*"):
            default = "required"  # argparse marks a positional of nargs * required too, though it may be empty
        elif entry in USAGE_HELP and action.default in (None, ""):
            default = None
        else:
            default = shown_default(action)
        rows[documented(action)] = default
    return rows


def test_every_entry_point_has_one_table():
    assert set(doc_tables()) == set(ENTRY_POINTS)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_flag_is_documented_with_its_default(entry):
    table = doc_tables()[entry]
    for names, default in parser_rows(entry).items():
        assert names in table, f"docs/flags.md: {entry} lacks a row for {', '.join(sorted(names))}"
        if default is not None:
            assert table[names] == default, (f"docs/flags.md: {entry} {', '.join(sorted(names))} shows default "
                                             f"{table[names]!r}, the parser {default!r}")
        else:
            assert table[names], f"docs/flags.md: {entry} {', '.join(sorted(names))} has no default in words"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_documented_flag_exists(entry):
    rows = parser_rows(entry)
    for names in doc_tables()[entry]:
        assert names in rows, f"docs/flags.md: {entry} has no flag {', '.join(sorted(names))} (any more)"


@pytest.mark.parametrize("entry", sorted(set(ENTRY_POINTS) - set(USAGE_HELP)))
def test_every_flag_has_a_help_text_and_help_shows_its_default(entry):
    parser = ENTRY_POINTS[entry]()
    assert isinstance(parser, FlagParser)
    shown = "".join(parser.format_help().split())  # argparse wraps lines, even inside a word with a hyphen
    for action in parser._actions:
        assert help_text(action).strip(), f"{entry}: {action.option_strings or action.dest} has no help text"
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            default = shown_default(action)
            assert default is not None, (f"{entry}: {action.option_strings[0]} defaults to None: its help must "
                                         "say what that means, ending with (default: ...)")
            assert "".join(f"(default: {default})".split()) in shown, (entry, action.option_strings)


@pytest.mark.parametrize("entry", sorted(USAGE_HELP))
def test_usage_text_names_every_flag(entry):
    """A script whose --help is its own usage text names every option in it (its cells as CELL)."""
    parser = ENTRY_POINTS[entry]()
    assert parser.format_help() == USAGE_HELP[entry]
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            name = action.option_strings[0] if action.option_strings else "CELL"
            assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", USAGE_HELP[entry]), (entry, name)


def test_defaults_of_switches_and_none_read_as_in_the_docs():
    parser = FlagParser()
    parser.add_argument("--on", action=argparse.BooleanOptionalAction, default=True, help="a switch")
    parser.add_argument("--flag", action="store_true", help="a flag")
    parser.add_argument("--empty", default="", help="a text")
    parser.add_argument("--some", default=None, help="a value (default: chosen later)")
    parser.add_argument("--many", type=int, nargs="*", default=[1, 2], help="values")
    shown = {a.dest: shown_default(a) for a in parser._actions if a.option_strings and a.dest != "help"}
    assert shown == {"on": "on", "flag": "off", "empty": '""', "some": "chosen later", "many": "1 2"}
    text = " ".join(parser.format_help().split())
    assert "a switch (default: on)" in text and "(default: True)" not in text
    assert "a value (default: chosen later)" in text and text.count("(default:") == 5
