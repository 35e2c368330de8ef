"""The run lock: one launch of a run at a time, even when a launch races the one before it."""

import fcntl
from pathlib import Path

import pytest

from runs.errors import RunError
from runs.layout import RunLayout


def test_a_second_lock_of_a_held_run_is_refused(tmp_path):
    layout = RunLayout(tmp_path, "mlp", "r")
    held = layout.lock()
    with pytest.raises(RunError, match="is being trained right now by pid"):
        layout.lock()
    layout.unlock(held)
    layout.unlock(layout.lock())  # free again once released
    assert not (layout.run_dir / ".lock").exists()  # a finished run leaves no lock file


def test_a_lock_on_a_lock_file_already_removed_does_not_count(tmp_path, monkeypatch):
    """A launch that opened ``.lock`` just before the holder's ``unlock`` removed it could
    lock the removed file, while the next launch locks a new one: two runs at once. The
    lock counts only if it is on the file at the path."""
    layout = RunLayout(tmp_path, "mlp", "r")
    first = layout.lock()
    late = (layout.run_dir / ".lock").open("a+")  # opened before the first launch lets go
    layout.unlock(first)
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # control: the removed file's lock is free to take
    fcntl.flock(late, fcntl.LOCK_UN)
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: late if self.name == ".lock" else real_open(self, *a, **k))
    with pytest.raises(RunError, match="being trained right now"):
        layout.lock()
    monkeypatch.undo()
    layout.unlock(layout.lock())  # a fresh launch takes the lock at the path
