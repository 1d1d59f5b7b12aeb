"""hostd's reading of a QEMU's process state: a process that exits while /proc is read is gone,
not an error (shell simulation seed 4402: the kernel answers ESRCH to a read of
/proc/PID/stat whose process exited after the open, and the exception escaped)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostd import qemu


def test_a_running_process_is_alive_and_a_reaped_one_is_not() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert qemu.alive(proc.pid) and qemu.can_still_act(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not qemu.alive(proc.pid) and not qemu.can_still_act(proc.pid)


def test_a_process_exiting_while_proc_is_read_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:

        def exited_mid_read(self: Path, *args: object, **kwargs: object) -> str:
            raise ProcessLookupError(3, "No such process")

        # os.kill(pid, 0) still finds it; the read of its /proc files is what meets the exit.
        monkeypatch.setattr(Path, "read_text", exited_mid_read)
        assert not qemu.alive(proc.pid)
        assert not qemu.can_still_act(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("written", "read"),
    [("0", None), ("-1", None), ("1", None), ("", None), ("12x", None), ("4242\n", 4242)],
)
def test_a_pidfile_names_a_qemu_or_nothing(tmp_path: Path, written: str, read: int | None) -> None:
    """A pidfile saying 0, -1 or 1 would have kill() signal hostd's own process group, every
    process, or init: it names no QEMU."""
    paths = qemu.VmPaths(tmp_path)
    paths.pidfile.write_text(written)
    assert qemu.read_pid(paths) == read
