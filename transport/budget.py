"""Server-wide accounting of bytes held in unfinished frames, shared by every connection of a listener.

Two counts: ``held``, the bytes of unfinished frames actually received on streams nobody reserved room for, and
``reserved``, the room promised to granted uploads (an UPLOAD_GRANT reserves the UPDATE's declared size before it
is sent, so a well-behaved client's upload is never refused halfway). A new bulk stream without a reservation is
refused once ``held + reserved`` would pass the limit; a granted one never is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BufferBudget:
    limit: int
    held: int = 0
    reserved: int = 0
    peak: int = 0

    @property
    def used(self) -> int:
        return self.held + self.reserved

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; the caller owes one :meth:`unreserve` of the same amount."""
        if not self.fits(nbytes):
            return False
        self.reserved += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def unreserve(self, nbytes: int) -> None:
        self.reserved = max(self.reserved - nbytes, 0)

    def charge(self, delta: int) -> None:
        """Bytes held moved by ``delta`` (negative when frames complete or streams go)."""
        self.held = max(self.held + delta, 0)
        self.peak = max(self.peak, self.used)
