"""Tests of lungct.cli: checked numbers, one-line logs and the error boundary."""

from __future__ import annotations

import argparse
import logging

import pytest

from lungct.cli import configure_logging, finite_float, positive_int, run_main
from lungct.errors import UserError


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "abc", ""])
def test_finite_float_refuses_what_is_not_a_finite_number(text: str) -> None:
    """NaN, infinities and text are argparse errors, with the value in the message."""
    with pytest.raises(argparse.ArgumentTypeError, match="expected a"):
        finite_float(text)


def test_positive_int_refuses_zero_and_text() -> None:
    """0, -3 and 1.5 are refused; 7 is 7."""
    assert positive_int("7") == 7
    for text in ("0", "-3", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
            positive_int(text)


def _boom() -> None:
    raise RuntimeError("the second line\nof the message")


def test_unexpected_errors_are_one_line_without_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected exception is exit 1 and one line; the traceback needs --verbose."""
    configure_logging()
    assert run_main(_boom) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["ERROR unexpected error RuntimeError: the second line (re-run "
                                "with --verbose for the traceback; please report it)"]
    configure_logging(verbose=True)
    assert run_main(_boom) == 1
    assert "Traceback" in capsys.readouterr().err


def test_user_errors_keep_their_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    """A UserError is its sentence and its code."""
    configure_logging()

    def refuse() -> None:
        raise UserError("no such thing", exit_code=3)

    assert run_main(refuse) == 3
    assert capsys.readouterr().err == "ERROR no such thing\n"


def test_third_party_records_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A pydicom error record with a traceback reaches the terminal as one line."""
    configure_logging()
    try:
        raise ValueError("bad tag\nmore detail")
    except ValueError:
        logging.getLogger("pydicom").error("could not read %s", "x.dcm\nsecond", exc_info=True)
    assert capsys.readouterr().err == "ERROR pydicom: could not read x.dcm\n"
