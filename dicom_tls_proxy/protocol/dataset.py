"""Does a data set parse as its transfer syntax? A walk over the element structure (PS3.5 7.1-7.5
and A.4) that reads every header and skips every value.

Why this exists: a store-and-forward route acknowledges a C-STORE only for an instance it can hand
on, and answers 0xC000 (cannot understand) to a data set that does not parse as the negotiated
transfer syntax (issue 14). pydicom's reader is built to be lenient: it reads a truncated or
garbage data set without complaint and warns. The proxy needs the strict question, and only it:
every length must fit exactly inside its container, every sequence and item must be closed, and
the data set must end where its last element ends. Values are never read or judged.

What it must never do: touch files, sockets or clocks; copy the data set (it walks a buffer,
memory-mapped by the caller for a large instance); recurse without bound; or raise on hostile
bytes: every problem is returned as words.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

from dicom_tls_proxy.protocol.uids import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE

Buffer = bytes | bytearray | memoryview

UNDEFINED: Final = 0xFFFFFFFF
ITEM: Final = 0xFFFEE000
ITEM_END: Final = 0xFFFEE00D
SEQUENCE_END: Final = 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS: Final = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
MAX_DEPTH: Final = 32  # nested sequences; real data sets stay under 10


class _Bad(Exception):
    pass


def data_set_problem(data: Buffer, transfer_syntax: str) -> str:
    """ "" when `data` parses as a whole data set in `transfer_syntax` (an encapsulated one is
    explicit VR little endian; deflated is inflated first), else why not, in words."""
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(data)) + inflater.flush()
        except zlib.error as exc:
            return f"the deflated data set does not inflate: {exc}"
    walker = _Walker(
        data, implicit=transfer_syntax == IMPLICIT_VR_LE, little=transfer_syntax != EXPLICIT_VR_BE
    )
    try:
        walker.data_set(0, len(data), depth=0, until_item_end=False)
    except _Bad as exc:
        return str(exc)
    return ""


class _Walker:
    def __init__(self, data: Buffer, *, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        order = "<" if little else ">"
        self.tag = struct.Struct(order + "HH")
        self.u16 = struct.Struct(order + "H")
        self.u32 = struct.Struct(order + "I")

    def _unpack_tag(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise _Bad(f"an element header is cut off at byte {pos} of the data set")
        group, element = self.tag.unpack_from(self.data, pos)
        return int((group << 16) | element)

    def data_set(self, pos: int, end: int, *, depth: int, until_item_end: bool) -> int:
        """Walk elements from `pos`; up to `end` exactly, or (undefined-length item) up to and
        including the item delimiter. Returns the position after the last byte walked."""
        if depth > MAX_DEPTH:
            raise _Bad(f"sequences nested deeper than {MAX_DEPTH}")
        while pos < end:
            tag = self._unpack_tag(pos, end)
            if tag == ITEM_END:
                if not until_item_end:
                    raise _Bad(f"an item delimiter at byte {pos} outside an item")
                return pos + 8
            if tag in (ITEM, SEQUENCE_END):
                raise _Bad(f"an item tag at byte {pos} where an element was expected")
            pos = self._element(pos, end, tag, depth)
        if until_item_end:
            raise _Bad("an item of undefined length is not closed by its delimiter")
        if pos != end:
            raise _Bad(f"the last element runs {pos - end} bytes past the end of its container")
        return pos

    def _element(self, pos: int, end: int, tag: int, depth: int) -> int:
        data = self.data
        if self.implicit or (tag >> 16) == 0xFFFE:
            vr = b""
            (length,) = self.u32.unpack_from(data, pos + 4)
            value = pos + 8
        else:
            vr = bytes(data[pos + 4 : pos + 6])
            if not (vr.isalpha() and vr.isupper()):
                raise _Bad(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR: {vr!r}")
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise _Bad(f"an element header is cut off at byte {pos} of the data set")
                (length,) = self.u32.unpack_from(data, pos + 8)
                value = pos + 12
            else:
                (length,) = self.u16.unpack_from(data, pos + 6)
                value = pos + 8
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if length != UNDEFINED:
            if value + length > end:
                raise _Bad(f"element {name} of {length} bytes runs past the end of its container")
            if vr == b"SQ":  # implicit VR: a sequence of defined length is skipped unread
                self._items(value, value + length, depth, defined=True, fragments=False)
            return int(value + length)
        if vr in (b"OB", b"OW"):  # encapsulated pixel data: fragments, not data sets
            return self._items(value, end, depth, defined=False, fragments=True)
        if vr == b"UN":  # an undefined-length UN is a sequence in implicit VR LE (PS3.5 6.2.2)
            inner = _Walker(self.data, implicit=True, little=True)
            return int(inner._items(value, end, depth, defined=False, fragments=False))
        if vr not in (b"SQ", b""):
            raise _Bad(f"element {name} has VR {vr.decode()} and an undefined length")
        return self._items(value, end, depth, defined=False, fragments=False)

    def _items(self, pos: int, end: int, depth: int, *, defined: bool, fragments: bool) -> int:
        """The items of a sequence (data sets) or of encapsulated pixel data (`fragments`): up
        to `end` exactly when the sequence has a defined length, else up to its delimiter."""
        while pos < end:
            tag = self._unpack_tag(pos, end)
            (length,) = self.u32.unpack_from(self.data, pos + 4)
            if tag == SEQUENCE_END:
                if defined:
                    raise _Bad(f"a sequence delimiter at byte {pos} in a defined-length sequence")
                return pos + 8
            if tag != ITEM:
                raise _Bad(f"byte {pos}: an item was expected in a sequence")
            pos += 8
            if length == UNDEFINED:
                if fragments:
                    raise _Bad(f"byte {pos}: a pixel data fragment of undefined length")
                pos = self.data_set(pos, end, depth=depth + 1, until_item_end=True)
            else:
                if pos + length > end:
                    raise _Bad(f"an item of {length} bytes runs past the end of its sequence")
                if not fragments:
                    self.data_set(pos, pos + length, depth=depth + 1, until_item_end=False)
                pos += length
        if not defined:
            raise _Bad("a sequence of undefined length is not closed by its delimiter")
        return pos
