"""Incremental detokenization with stop strings.

Text is released only once it cannot be the start of a stop string, so a
client never sees half of a stop marker that is then taken back.
"""

from __future__ import annotations

from typing import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        # Decode a short window, not the whole answer, on every token; the
        # window starts one token back so leading-space rules come out right.
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # all text decoded so far
        self._sent = 0  # how much of _text the caller has received
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to release."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        window = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            # nothing printable yet, or half of a multi-byte character
            return ""
        self._text += window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        for stop in self._stop:
            # search only where a new match can begin, so earlier text stays final
            at = self._text.find(stop, max(0, self._sent - len(stop) + 1))
            if at != -1:
                self._text = self._text[:at]
                self.stopped = True
        if self.stopped:
            return self._release(len(self._text))
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """Release everything held back (the answer ended for another reason)."""
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self._sent)
        delta = self._text[self._sent : upto]
        self._sent = upto
        return delta
