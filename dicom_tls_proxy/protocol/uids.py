"""Names for UIDs in log lines ("CT Image Storage"), from pydicom's own UID dictionary.

Why not `pydicom.uid.UID(x).name`: importing pydicom costs about 29 MiB of memory and a quarter of a
second, and the proxy needs one dictionary from it. This module loads only pydicom's generated
`_uid_dict.py` file (about 150 KiB in memory) without running pydicom's package import. If that
file ever moves, names fall back to the UIDs themselves; nothing else depends on it.

Not pure at import: that file is found, read and executed (it holds one generated dict) once,
when this module is first imported; `uid_name` is a dictionary lookup after that.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _load() -> dict[str, str]:
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
        return {uid: str(entry[0]) for uid, entry in module.UID_dictionary.items()}
    except (ImportError, OSError, SyntaxError, AttributeError, IndexError, TypeError):
        return {}


NAMES: dict[str, str] = _load()


def uid_name(uid: str) -> str:
    """The dictionary name of a UID, or the UID itself when it is not a standard one."""
    return NAMES.get(uid, uid)
