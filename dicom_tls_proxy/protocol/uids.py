"""Names for UIDs in log lines ("CT Image Storage"), and which UIDs are Storage SOP Classes and
uncompressed transfer syntaxes, from pydicom's own UID dictionary.

Why not `pydicom.uid.UID(x).name`: importing pydicom costs about 29 MiB of memory and a quarter of a
second, and the proxy needs one dictionary from it. This module loads only pydicom's generated
`_uid_dict.py` file (about 150 KiB in memory) without running pydicom's package import. If that
file ever moves, names fall back to the UIDs themselves; nothing else depends on it.

The Storage SOP Classes are what a store-and-forward route accepts (issue 14: "the storage SOP
classes of the DICOM dictionary pydicom ships"): every SOP Class whose keyword names a Storage
class (not Storage Commitment, not the DICOMDIR's Media Storage Directory) or whose UID lies under
the storage root 1.2.840.10008.5.1.4.1.1, retired ones included: old modalities send those.

Not pure at import: that file is found, read and executed (it holds one generated dict) once,
when this module is first imported; `uid_name` is a dictionary lookup after that.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The proxy's own, in what it says as a DICOM application: its probes' and forwarder's RQs, a
# store-and-forward route's AC, the file meta of its spool files.
IMPLEMENTATION_CLASS_UID = "2.25.80567781562008035110521856474551951270"
IMPLEMENTATION_VERSION = "DICOMTLSPROXY"
STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
# Native (not encapsulated) encodings: an instance in one can be rewritten in another by pydicom.
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE)
_NOT_STORAGE = ("StorageCommitment", "MediaStorageDirectoryStorage")


def _load() -> dict[str, tuple[str, ...]]:
    try:
        spec = importlib.util.find_spec("pydicom")
        if spec is None or not spec.submodule_search_locations:
            return {}
        path = Path(next(iter(spec.submodule_search_locations))) / "_uid_dict.py"
        module_spec = importlib.util.spec_from_file_location("_dicom_tls_proxy_uid_names", path)
        if module_spec is None or module_spec.loader is None:
            return {}
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return {uid: tuple(map(str, entry)) for uid, entry in module.UID_dictionary.items()}
    except (ImportError, OSError, SyntaxError, AttributeError, IndexError, TypeError):
        return {}


_ENTRIES = _load()  # uid -> (name, type, info, retired, keyword)
NAMES: dict[str, str] = {uid: entry[0] for uid, entry in _ENTRIES.items()}


def _is_storage(uid: str, entry: tuple[str, ...]) -> bool:
    if len(entry) < 5 or entry[1] != "SOP Class" or any(n in entry[4] for n in _NOT_STORAGE):
        return False
    return "Storage" in entry[4] or uid.startswith(STORAGE_ROOT)


STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    uid for uid, entry in _ENTRIES.items() if _is_storage(uid, entry)
)


def uid_name(uid: str) -> str:
    """The dictionary name of a UID, or the UID itself when it is not a standard one."""
    return NAMES.get(uid, uid)
