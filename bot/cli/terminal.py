"""Text from elsewhere (a rented box, Vast.ai, R2) made safe for the operator's terminal: escape
sequences (OSC 52 clipboard writes, title changes, cursor games) are stripped (review L2), and Rich
markup in messages is escaped so it prints as text (review L8)."""

from __future__ import annotations

import re

from rich.markup import escape

# C0 controls but \t \n \r (progress bars redraw with \r; none of the three starts a sequence),
# DEL, and the C1 controls (U+0080-U+009F: 8-bit CSI, OSC, ...)
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    return _CONTROLS.sub("", text)


def plain(text: str) -> str:
    """For Rich output: no control characters, and markup shown literally."""
    return escape(strip_controls(text))
