"""Where a read of a container's log got to, so that a read from there repeats nothing.

Docker 20.10's follow of a json-file log ends at the end of a rotated file (the log's
`max-size`): 5 MB of 27-character lines (18 MB of JSON against 10 MB files) stopped at
2.8 MB. So the log is read with timestamps, and when a follow ends early it is read again
`since` the last timestamp seen. Docker writes them fixed-width (RFC3339NanoFixed), so
they order as strings; several messages can carry one timestamp, so their count is kept.
"""

from __future__ import annotations

from datetime import datetime


class LogMark:
    def __init__(self) -> None:
        self.last = ""  # the last admitted message's timestamp
        self.count = 0  # how many admitted messages carried it
        self._skip = 0  # of those, how many the current read has yet to repeat

    def reread(self) -> str:
        """Start a new read: the `since` to ask Docker for (inclusive, so the messages
        at the last timestamp come again and are skipped)."""
        self._skip = self.count
        if not self.last:
            return "0"
        zone = self.last[29:]
        when = datetime.fromisoformat(self.last[:19] + ("+00:00" if zone == "Z" else zone))
        return f"{int(when.timestamp())}.{self.last[20:29]}"

    def admit(self, frame: str) -> str | None:
        """A message of the log as Docker sent it (`<timestamp> <text>`): its text if it is
        new, None if an earlier read gave it already."""
        stamp, sep, text = frame.partition(" ")
        if not sep or len(stamp) < 30 or stamp[19] != ".":
            return frame  # not a timestamped message: nothing to order it by
        if stamp < self.last:
            return None
        if stamp == self.last:
            if self._skip:
                self._skip -= 1
                return None
            self.count += 1
        else:
            self.last, self.count, self._skip = stamp, 1, 0
        return text
