"""Store-and-forward to an upstream that takes fewer transfer syntaxes than the modality sends
(issue 14, Forwarding): an uncompressed instance is converted with pydicom and its pixel values
arrive unchanged, whatever its byte order; a compressed one goes to failed/ with the reason.
The modality and the upstream are pynetdicom; the instances are pydicom's own test files.
"""

from __future__ import annotations

import array
import json
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from tests.support import RawClient, make_dataset, running_proxy, wait_until
from tests.test_store_and_forward import plaintext_config, sf_route
from tests.test_store_protocol import encoded

IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


def pixel_values(ds: Any) -> list[int]:
    """The pixel values of a native image, read in its own byte order (no numpy needed)."""
    if ds.BitsAllocated == 8:
        return list(ds.PixelData)
    values = array.array("H", ds.PixelData)
    big = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    if big != (sys.byteorder == "big"):
        values.byteswap()
    return values.tolist()


@contextmanager
def implicit_only_pacs(syntax: str = IMPLICIT) -> Iterator[tuple[int, list[Any]]]:
    """A pynetdicom SCP that accepts its storage SOP classes in `syntax` only; yields its port
    and the data sets it stored."""
    got: list[Any] = []
    ae = AE("PACS")
    for sop_class in (MRImageStorage, SecondaryCaptureImageStorage, CTImageStorage):
        ae.add_supported_context(sop_class, [syntax])

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield int(server.server_address[1]), got
    finally:
        server.shutdown()


def test_uncompressed_instances_are_converted_and_a_jpeg_one_fails(tmp_path: Path) -> None:
    names = ["MR_small_bigendian.dcm", "image_dfl.dcm", "CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
    sent = [pydicom.dcmread(get_testdata_file(name)) for name in names]
    big_endian, deflated, little, jpeg = sent
    spool = tmp_path / "spool"
    with implicit_only_pacs() as (port, got):
        route = sf_route(f"127.0.0.1:{port}", spool)
        with running_proxy(tmp_path, plaintext_config(route)) as proxy:
            scu = AE("MODALITY")
            for ds in sent:
                scu.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
            host, listening = proxy.address("legacy-in")
            assoc = scu.associate(host, listening, ae_title="PACS")
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(ds).Status) for ds in sent]
            assoc.release()
            assert statuses == [0x0000] * 4
            wait_until(lambda: len(got) == 3, what="three instances at the PACS")
            failed = proxy.wait_for(event="failed")
            wait_until(lambda: not list(spool.glob("*.dcm")), what="an empty queue")
    assert failed["sop_instance"] == jpeg.SOPInstanceUID
    assert "JPEG Baseline (Process 1) is compressed and is not converted" in failed["reason"]
    (reason,) = [json.loads(p.read_text()) for p in (spool / "failed").glob("*.json")]
    assert reason["failed_reason"] == failed["reason"]
    arrived = {ds.SOPInstanceUID: ds for ds in got}
    for original in (big_endian, deflated, little):
        ds = arrived[original.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert pixel_values(ds) == pixel_values(original)
        assert ds.Rows == original.Rows and ds.PatientName == original.PatientName


def test_an_instance_pydicom_cannot_convert_goes_to_failed_and_the_rest_flows(
    tmp_path: Path,
) -> None:
    """An implicit VR instance whose structure is sound (so it was acknowledged) but whose Rows
    value is 3 bytes long: pydicom cannot write it in explicit VR. It goes to failed/ with the
    reason; the forwarder, and the proxy, go on with the next instance."""
    from dicom_tls_proxy.protocol import dimse, messages, pdu
    from dicom_tls_proxy.protocol.pdu_items import PresentationContextItem

    good = make_dataset(32, 32, seed=9)
    odd = make_dataset(32, 32, seed=10)
    data = {ds.SOPInstanceUID: encoded(ds, IMPLICIT) for ds in (odd, good)}
    rows = struct.pack("<HHIH", 0x0028, 0x0010, 2, odd.Rows)
    data[odd.SOPInstanceUID] = data[odd.SOPInstanceUID].replace(
        rows, struct.pack("<HHI", 0x0028, 0x0010, 3) + b"abc"[: 3 - 1] + b"\0", 1
    )
    spool = tmp_path / "spool"
    with implicit_only_pacs(EXPLICIT) as (port, got):
        route = sf_route(f"127.0.0.1:{port}", spool)
        with running_proxy(tmp_path, plaintext_config(route)) as proxy:
            client = RawClient(proxy.address("legacy-in"))
            contexts = [PresentationContextItem(1, CTImageStorage, (IMPLICIT,))]
            client.send(
                pdu.encode_associate_rq("PACS", "RAW", contexts, implementation_class_uid="2.25.7")
            )
            assert client.read_pdu()[0] == pdu.A_ASSOCIATE_AC
            for number, (uid, body) in enumerate(data.items(), start=1):
                command = dimse.c_store_rq(number, CTImageStorage, uid)
                client.send(b"".join(messages.fragments(1, command, 16384, command=True)))
                client.send(b"".join(messages.fragments(1, body, 16384, command=False)))
                assert dimse.parse_command(client.read_pdu()[12:]).status == 0x0000
            client.send(pdu.encode_release_rq())
            assert client.read_pdu()[0] == pdu.A_RELEASE_RP
            client.close()
            failed = proxy.wait_for(event="failed")
            wait_until(lambda: len(got) == 1, what="the sound instance at the PACS")
            assert proxy.proc.poll() is None
    assert failed["sop_instance"] == odd.SOPInstanceUID
    assert failed["reason"] == (
        "cannot be converted to Explicit VR Little Endian: pydicom refused it "
        "(BytesLengthException at element (0028,0010))"
    )
    assert got[0].SOPInstanceUID == good.SOPInstanceUID
    assert not [line for line in proxy.raw if "Traceback" in line]
