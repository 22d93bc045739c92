"""The spool's DICOM Part-10 files, through pydicom: the header written before a data set, the
check that a data set parses, the file meta read back, and a data set rewritten in another
uncompressed transfer syntax for an upstream that does not take the one it came in.

Why apart from `spool`: the spool is about durability (names, fsync, renames, locks); this is
about what is in a file. pydicom is imported inside the functions: it costs a quarter of a second
and tens of MiB, which a proxy without store-and-forward routes never pays.

What it must never do: write or remove a spool file (that is `spool`'s), or change the bytes of a
data set it only checks.
"""

from __future__ import annotations

import array
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_tls_proxy.protocol import dataset
from dicom_tls_proxy.protocol.uids import EXPLICIT_VR_BE, IMPLICIT_VR_LE

PREAMBLE = 128 + 4  # the preamble and "DICM"
GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL, explicit VR: tag, VR, length, value


def load_pydicom() -> None:
    """Import what the functions below use, ahead of the first instance."""
    import pydicom.filereader
    import pydicom.filewriter  # noqa: F401


class ConversionError(Exception):
    """pydicom could not rewrite a data set in another transfer syntax; the message says why. A
    data set the proxy acknowledged (its structure walked strictly) can still hold a value pydicom
    cannot encode, such as a US element of 3 bytes."""


@dataclass(frozen=True)
class FileFacts:
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    data_offset: int
    size: int


def header(
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    calling_ae: str,
    called_ae: str,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> bytes:
    """The preamble, "DICM" and the file meta information group (PS3.10 7.1) of an instance:
    the sender's AE title is its Source (and Sending) Application Entity Title, the title it
    called its Receiving Application Entity Title, so that the file alone says what forwarding
    needs."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = UID(sop_class)
    file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    file_meta.TransferSyntaxUID = UID(transfer_syntax)
    file_meta.ImplementationClassUID = UID(implementation_class_uid or "2.25.1")
    if implementation_version_name:
        file_meta.ImplementationVersionName = implementation_version_name
    if calling_ae:
        file_meta.SourceApplicationEntityTitle = calling_ae
        file_meta.SendingApplicationEntityTitle = calling_ae
    if called_ae:
        file_meta.ReceivingApplicationEntityTitle = called_ae
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    return bytes(buffer.getvalue())


def data_set_problem(path: Path, data_offset: int, transfer_syntax: str) -> str:
    """Why the file's data set (from `data_offset`) does not parse as `transfer_syntax`, or ""
    (`protocol.dataset`'s strict walk, over the file mapped in memory, not read)."""
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size <= data_offset:
                return "the C-STORE-RQ carried an empty data set"
            with (
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
                memoryview(mapped) as whole,
                whole[data_offset:] as view,
            ):
                return dataset.data_set_problem(view, transfer_syntax)
    except OSError as exc:
        return f"the stored data set cannot be read back: {exc}"


def read_meta(path: Path) -> FileFacts | None:
    """The file meta of a spool file; None if it cannot be read."""
    from pydicom.filereader import read_file_meta_info

    try:
        file_meta = read_file_meta_info(path)
        offset = PREAMBLE + GROUP_LENGTH_ELEMENT + int(file_meta.FileMetaInformationGroupLength)
        return FileFacts(
            sop_class=str(file_meta.MediaStorageSOPClassUID),
            sop_instance=str(file_meta.MediaStorageSOPInstanceUID),
            transfer_syntax=str(file_meta.TransferSyntaxUID),
            calling_ae=str(file_meta.get("SourceApplicationEntityTitle", "")),
            called_ae=str(file_meta.get("ReceivingApplicationEntityTitle", "")),
            data_offset=offset,
            size=path.stat().st_size - offset,
        )
    except Exception:  # anything pydicom raises on a damaged file: "unreadable"
        return None


def data_set_as(path: Path, transfer_syntax: str) -> bytes:
    """The file's data set encoded in the uncompressed `transfer_syntax` (implicit or explicit
    VR little endian, explicit big endian); the caller checked that its own syntax is
    uncompressed too. Pixel data are rewritten value by value, never decompressed. pydicom
    re-encodes the numbers it parses (US, FL...) in the new byte order but writes OW, OF, OL,
    OD and OV values as the bytes it read: when the byte order changes they are swapped here,
    word by word, or a big endian image would arrive with its pixel values scrambled.
    OSError when the file cannot be read; ConversionError for anything pydicom refuses."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    with path.open("rb") as handle:
        try:
            data_set = pydicom.dcmread(handle)
            little = transfer_syntax != EXPLICIT_VR_BE
            if little != (data_set.file_meta.TransferSyntaxUID != EXPLICIT_VR_BE):
                data_set.walk(_swap_words)
            buffer = DicomBytesIO()
            buffer.is_little_endian = little
            buffer.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LE
            write_dataset(buffer, data_set)
        except Exception as exc:  # whatever pydicom raises on a value it cannot encode
            raise ConversionError(_conversion_problem(exc)) from None
    return bytes(buffer.getvalue())


def _conversion_problem(exc: Exception) -> str:
    """What pydicom refused, without its message: that quotes the value (PHI, perhaps) and a
    whole traceback. Its first element tag, if it names one, says where."""
    where = _TAG.search(str(exc))
    at = f" at element ({where[1].upper()},{where[2].upper()})" if where else ""
    return f"pydicom refused it ({type(exc).__name__}{at})"


_TAG = re.compile(r"\(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)")
_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}  # bytes per word
_TYPECODE = {array.array(code).itemsize: code for code in "HIQ"}  # unsigned, by width


def _swap_words(_: Any, element: Any) -> None:
    """`Dataset.walk` callback: swap the byte order of an OW/OF/OL/OD/OV value in place."""
    width = _WIDTH.get(element.VR)
    if width is None or not isinstance(element.value, bytes | bytearray) or not element.value:
        return
    words = array.array(_TYPECODE[width])
    if len(element.value) % words.itemsize:
        return  # not whole words: nothing sensible to swap; the upstream judges it
    words.frombytes(element.value)
    words.byteswap()
    element.value = words.tobytes()
