"""whimbrelctl refuses malformed fleet flags itself (exit 2, naming the flag), before it
reaches a coordinator."""

from __future__ import annotations

import pytest

from whimbrel.ctl import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["limits", "set", "--cluster", "-1"], "--cluster: -1: a limit is 0 (no limit) or more"),
        (["policy", "define", "p", "--downtime-steps", "100,x"], "milliseconds, comma-separated"),
        (["policy", "define", "p", "--downtime-steps", "100,0"], "each step above 0 ms"),
        (["host", "drain"], "the following arguments are required: HOST"),
    ],
)
def test_bad_flags_exit_2_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--coordinator", "127.0.0.1:1", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
