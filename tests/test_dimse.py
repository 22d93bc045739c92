"""Tests for dicom_tls_proxy.protocol.dimse: the probe's C-ECHO-RQ and its reading of a C-ECHO-RSP,
against pydicom and pynetdicom as independent references. Plain bytes, no sockets; the probe's
behaviour on a network is tests/test_echo.py's."""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable

import pytest
from pydicom.filereader import read_dataset

from dicom_tls_proxy.protocol import dimse, pdu
from dicom_tls_proxy.protocol.pdu_items import pdv_items
from tests.test_echo import dimse_rsp


def test_c_echo_rq_read_by_pydicom() -> None:
    command = dimse.c_echo_rq(7)
    ds = read_dataset(io.BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    assert ds.AffectedSOPClassUID == dimse.VERIFICATION == "1.2.840.10008.1.1"
    assert (ds.CommandField, ds.MessageID, ds.CommandDataSetType) == (0x0030, 7, 0x0101)
    assert ds.CommandGroupLength == len(command) - 12  # after the group length element itself
    assert set(dimse.command_fields(command)) == {0x0, 0x2, 0x100, 0x110, 0x800}


def test_encode_p_data_read_back() -> None:
    raw = dimse.encode_p_data(3, dimse.c_echo_rq(), command=True)
    assert isinstance(pdu.parse_pdu(raw), pdu.DataTransfer)
    assert pdv_items(raw, pdu.HEADER_LENGTH) == [(3, 0x03, dimse.c_echo_rq())]
    fragment = dimse.encode_p_data(1, b"xy", command=False, last=False)
    assert pdv_items(fragment, pdu.HEADER_LENGTH) == [(1, 0x00, b"xy")]


@pytest.mark.parametrize("status", [0x0000, 0x0110, 0xC123])
def test_echo_status_of_pynetdicoms_c_echo_rsp(status: int) -> None:
    raw = dimse_rsp("C-ECHO", status)
    [(context, control, command)] = pdv_items(raw, pdu.HEADER_LENGTH)
    assert (context, control) == (1, 0x03)
    assert dimse.echo_status(command) == status


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (lambda: _command_of(dimse_rsp("C-STORE", 0)), "a C-STORE-RSP (command field 0x8001)"),
        (lambda: dimse.c_echo_rq(), "a C-ECHO-RQ (command field 0x0030)"),
        (lambda: b"\xff" * 16, "a command set that does not parse (command element (ffff,ffff)"),
        (lambda: b"", "a command set without a command field"),
        (lambda: struct.pack("<HHIH", 0, 0x100, 2, 0x8030), "a C-ECHO-RSP without a status"),
    ],
)
def test_echo_status_refuses_what_is_no_c_echo_rsp(
    command: Callable[[], bytes], words: str
) -> None:
    with pytest.raises(dimse.NotEchoResponse, match=re.escape(words)):
        dimse.echo_status(command())


def _command_of(raw: bytes) -> bytes:
    return b"".join(data for _, _, data in pdv_items(raw, pdu.HEADER_LENGTH))


def test_describe_command_and_status() -> None:
    assert dimse.describe_command(0x0FFF) == "a C-CANCEL-RQ (command field 0x0fff)"
    assert dimse.describe_command(0x8120) == "a N-SET-RSP (command field 0x8120)"
    assert dimse.describe_command(0x4242) == "an unknown command (command field 0x4242)"
    assert dimse.describe_status(0x0122) == "status 0x0122 (SOP class not supported)"
    assert dimse.describe_status(0xB001) == "status 0xb001 (a warning)"
    assert dimse.describe_status(0xFF00) == "status 0xff00 (pending)"
    assert dimse.describe_status(0xA700) == "status 0xa700 (refused: out of resources)"
    assert dimse.describe_status(0xA900) == (
        "status 0xa900 (error: data set does not match SOP class)"
    )
    assert dimse.describe_status(0xC000) == "status 0xc000 (error: cannot understand)"
    assert dimse.describe_status(0x0110) == "status 0x0110 (processing failure)"
