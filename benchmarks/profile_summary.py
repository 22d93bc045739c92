"""Where the proxy's time went, from a `--profile` file (py-spy collapsed stacks).

    python3 benchmarks/profile_summary.py OUT/run-...-profiles/W1-proxy-term-1.txt [--top 25]

Prints the share of samples by the function they were in (self), and by the proxy module
frames they were under (inclusive), so a README summary needs no flame-graph viewer.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy raw frames: "receive_some (dicom_tls_proxy/transport/tlsstream.py:123)" or
# "SSL_read (libssl.so.3)"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    where = m["where"].rsplit(":", 1)[0]
    return f"{m['func']} ({Path(where).name})"


_SYSCALLS = ("send", "recv", "read", "write", "sendto", "recvfrom", "connect", "accept4", "close")


def _area(leaf: str) -> str:
    """Where a sample's time went, by the frame it was in."""
    m = _FRAME.match(leaf)
    func, where = (m["func"], m["where"]) if m else (leaf, "")
    if func == "epoll_wait":
        return "idle (epoll_wait)"
    if func in _SYSCALLS:
        return "kernel: socket system calls"
    if "memmove" in func or "memcpy" in func or "memset" in func:
        return "memory copies (libc)"
    if "_rust.abi3" in where:
        return "OpenSSL (crypto, TLS records, handshakes)"
    if "dicom_tls_proxy" in where:
        return "proxy Python code"
    if where.startswith("trio/") or "/trio/" in where:
        return "trio (scheduler, sockets, cancel scopes)"
    return "other (interpreter, cffi, libc, stdlib)"


def summarise(path: Path, top: int, busy: bool = False) -> str:
    selfs: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        area = _area(frames[-1])
        if busy and area.startswith("idle"):
            continue
        total += n
        areas[area] += n
        selfs[_name(frames[-1])] += n
        for name in {_name(f) for f in frames if "dicom_tls_proxy" in f}:
            inclusive[name] += n
    if not total:
        return f"{path}: no samples"
    what = "busy samples (idle left out)" if busy else "samples"
    lines = [f"{path.name}: {total} {what}", "", "by area:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in areas.most_common()]
    lines += ["", "self (the function the sample was in):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in selfs.most_common(top)]
    lines += ["", "inclusive, proxy frames:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--busy", action="store_true", help="leave out samples idle in epoll_wait")
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top, args.busy))
        print()


if __name__ == "__main__":
    main()
