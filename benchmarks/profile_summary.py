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

# py-spy raw frames: "receive_some (dicom_tls_proxy/tls.py:123)" or "SSL_read (libssl.so.3)"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    where = m["where"].rsplit(":", 1)[0]
    return f"{m['func']} ({Path(where).name})"


def summarise(path: Path, top: int) -> str:
    selfs: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        selfs[_name(frames[-1])] += n
        for name in {_name(f) for f in frames if "dicom_tls_proxy" in f}:
            inclusive[name] += n
    if not total:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} samples", "", "self (the function the sample was in):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in selfs.most_common(top)]
    lines += ["", "inclusive, proxy frames:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top))
        print()


if __name__ == "__main__":
    main()
