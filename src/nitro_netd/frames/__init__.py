"""Pure codecs for the frames that cross the link: no I/O, no state.

Each `parse_*` either returns a value or raises `FrameError` (carrying a `DropReason`);
anything else escaping a parser is a bug.
"""

from __future__ import annotations

from nitro_netd.frames.errors import DropReason, FrameError

__all__ = ["DropReason", "FrameError"]
