"""Fuzzed command lines: every stage answers bad values with exit 2 and one sentence.

Hypothesis draws flags of each stage's parser with hostile values (NaN, infinities, huge and
negative numbers, malformed lists and regular expressions, arbitrary text). The stage's
``run`` is replaced, so only parsing and configuration run: the boundary where every value a
user types is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lungct.interpret import cli as interpret_cli
from lungct.prepare import cli as prepare_cli
from lungct.train import cli as train_cli

STAGES = {"prepare": (prepare_cli, "lungct.prepare.stage.run"),
          "train": (train_cli, "lungct.train.stage.run"),
          "interpret": (interpret_cli, "lungct.interpret.stage.run")}
HOSTILE = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "1e308", "1e-9", "abc", "",
                     "0.5,0.5,0", "nan,0.5,0.5", "1,1", "(", "[a-", "lung", "-600,1500", "nan,1",
                     "1,inf", "1,2,3,4", "all", "baseline,baseline", "vgg16", "x=1",
                     "cancer_at_least=nan", "min_readers=0", "mirrored", "auto"]),
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions  # noqa: SLF001 - the parser's own flag list
            if a.option_strings and a.dest not in ("help", "verbose", "quiet")]


@pytest.mark.parametrize("stage", sorted(STAGES))
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_flags_exit_0_or_2_without_a_traceback(stage: str, data: st.DataObject) -> None:
    """Any drawn command line parses and configures, or exits 2 with one error line."""
    cli, run_path = STAGES[stage]
    actions = _flags(cli.build_parser())
    chosen = data.draw(st.lists(st.sampled_from(actions), min_size=1, max_size=4,
                                unique_by=lambda a: a.dest))
    argv = []
    for action in chosen:
        argv.append(action.option_strings[-1])
        if action.nargs != 0:
            argv.append(data.draw(HOSTILE))
    stderr = io.StringIO()
    with mock.patch(run_path, return_value={}), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main([*argv, "-q"])
        except SystemExit as stop:  # argparse refuses a value: its usage line and exit 2
            code = stop.code
    assert code in (0, 2), f"{argv} -> {code}: {stderr.getvalue()}"
    assert "Traceback" not in stderr.getvalue()
    if code == 2:
        errors = [line for line in stderr.getvalue().splitlines() if "error" in line.lower()]
        assert len(errors) == 1, f"{argv}: {stderr.getvalue()}"
