"""Assertions several test files share."""

from pathlib import Path

import pytest

from nano.errors import NanoError


def assert_refused_cleanly(call, out: Path, message: str) -> None:
    """`call()` raises one NanoError line matching `message` and leaves nothing at `out` or beside it."""
    with pytest.raises(NanoError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())
