"""Keeping cumulative streams proportional to what they carry.

The EAS protocols send the whole answer so far in every frame, so sending a
frame per token costs the square of the answer's length. The pacer lets a
frame through only while everything sent stays within `factor` times the
request plus the answer so far (plus a small allowance, so short answers
still stream token by token); long answers get fewer, larger steps.
"""

from __future__ import annotations

STREAM_FACTOR = 16
STREAM_SLACK = 64 * 1024


class CumulativePacer:
    def __init__(self, request_bytes: int, factor: float = STREAM_FACTOR, slack: int = STREAM_SLACK) -> None:
        self.request_bytes = request_bytes
        self.factor = factor
        self.slack = slack
        self.sent = 0

    def allow(self, frame_bytes: int, answer_bytes: int) -> bool:
        """Whether an intermediate frame fits the budget; it is counted when it does."""
        if self.sent + frame_bytes > self.factor * (self.request_bytes + answer_bytes) + self.slack:
            return False
        self.sent += frame_bytes
        return True
