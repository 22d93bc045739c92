"""Store-and-forward to an upstream that takes fewer transfer syntaxes than the modality sends
(issue 14, Forwarding): an uncompressed instance is converted with pydicom and its pixel values
arrive unchanged, whatever its byte order; a compressed one goes to failed/ with the reason.
The modality and the upstream are pynetdicom; the instances are pydicom's own test files.
"""

from __future__ import annotations

import array
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from tests.support import running_proxy, wait_until
from tests.test_store_and_forward import plaintext_config, sf_route


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
def implicit_only_pacs() -> Iterator[tuple[int, list[Any]]]:
    """A pynetdicom SCP that accepts its storage SOP classes in Implicit VR LE only; yields its
    port and the data sets it stored."""
    got: list[Any] = []
    ae = AE("PACS")
    for sop_class in (MRImageStorage, SecondaryCaptureImageStorage, CTImageStorage):
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2"])

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
