"""atomic_write: the old file stays whole until the new one is complete, and a failed write leaves no trace."""

from __future__ import annotations

import json

import pytest

from lib.files import atomic_write


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "stats.json"
    with atomic_write(str(path)) as f:
        json.dump({"version": 1}, f)
    assert json.loads(path.read_text()) == {"version": 1}

    with pytest.raises(RuntimeError), atomic_write(str(path)) as f:
        f.write('{"version": 2, "half')
        assert json.loads(path.read_text()) == {"version": 1}  # readers see the old file meanwhile
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.json"]

    with atomic_write(str(path), "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
