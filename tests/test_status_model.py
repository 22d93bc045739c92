"""The status page's pure parts: the peer inventory and its state file, the workers' merge, the
page's embedding and the terminal's text, against whatever a file or a peer could hold."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_tls_proxy.ops import inventory
from dicom_tls_proxy.ops.inventory import LIMIT, PeerExpiry, PeerInventory, merge, parse_state
from dicom_tls_proxy.ops.statuspage import as_text, render_page
from dicom_tls_proxy.ops.workersmetrics import merge_boards

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner),
    max_leaves=30,
)
ENTRY_KEYS = ("sha256", "subject", "issuer", "not_after", "first_seen", "last_seen")


def described(n: int, not_after: str = "2030-01-01T00:00:00Z") -> dict[str, str]:
    return {
        "sha256": f"sha256:{n:064x}",
        "subject": f"CN=peer {n}",
        "cn": f"peer {n}",
        "issuer": "CN=CA",
        "not_after": not_after,
    }


def stamp(i: int) -> str:
    return f"2026-12-03T10:{i // 60 % 60:02d}:{i % 60:02d}.000Z"


@given(st.text() | JSON.map(json.dumps))
@settings(max_examples=300)
def test_a_state_file_of_any_content_reads_as_well_formed_entries(text: str) -> None:
    entries = parse_state(text)
    assert len(entries) <= LIMIT
    for entry in entries:
        assert all(isinstance(entry[k], str) for k in ENTRY_KEYS)
        assert isinstance(entry["associations"], int) and entry["associations"] >= 0
    assert len({e["sha256"] for e in entries}) == len(entries)


def test_the_inventory_keeps_the_most_recently_seen_and_survives_a_save(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl.peers.json"
    kept = PeerInventory(path, limit=5)
    for i in range(8):
        kept.seen(described(i), stamp(i))
    kept.seen(described(3), stamp(9))  # seen again: the newest
    assert [e["sha256"][-1] for e in kept.as_json()] == ["3", "7", "6", "5", "4"]
    assert kept.entries[described(3)["sha256"]]["associations"] == 2
    assert kept.entries[described(3)["sha256"]]["first_seen"] == stamp(3)
    kept.save()
    again = PeerInventory(path, limit=5)
    again.load()
    assert again.as_json() == kept.as_json()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_half_written_state_file_is_an_empty_inventory(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    path.write_text('{"peer_certificates": [{"sha256": "sha256:00", "subj')
    broken = PeerInventory(path)
    broken.load()
    assert broken.as_json() == []


def test_the_state_file_lies_beside_the_audit_file_else_the_pid_file(tmp_path: Path) -> None:
    from dicom_tls_proxy.config.schema import AuditSettings, ProxySettings

    class Config:
        audit = AuditSettings(file=tmp_path / "audit.jsonl")
        proxy = ProxySettings(pid_file=tmp_path / "proxy.pid")

    config: Any = Config()
    assert inventory.state_path(config, None) == tmp_path / "audit.jsonl.peers.json"
    assert inventory.state_path(config, 1) == tmp_path / "audit.jsonl.peers-1.json"
    Config.audit = AuditSettings()
    assert inventory.state_path(config, None) == tmp_path / "proxy.pid.peers.json"
    Config.proxy = ProxySettings()
    assert inventory.state_path(config, None) is None
    assert inventory.state_path(config, 2, tmp_path) == tmp_path / "peers-2.json"


@given(st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), max_size=8), max_size=4))
def test_merged_inventories_sum_associations_and_span_first_to_last_seen(
    workers: list[list[tuple[int, int]]],
) -> None:
    inventories = []
    for seen in workers:
        one = PeerInventory(None)
        for n, i in sorted(seen, key=lambda s: s[1]):  # a process's clock goes forward
            one.seen(described(n), stamp(i))
        inventories.append(one.as_json())
    merged = {e["sha256"]: e for e in merge(inventories)}
    for n in range(6):
        sightings = [i for seen in workers for m, i in seen if m == n]
        sha = described(n)["sha256"]
        if not sightings:
            assert sha not in merged
            continue
        assert merged[sha]["associations"] == len(sightings)
        assert merged[sha]["last_seen"] == stamp(max(sightings))
        assert merged[sha]["first_seen"] <= merged[sha]["last_seen"]


def test_the_expiry_gauge_counts_down_to_not_after() -> None:
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5 * 86400))
    entries = [{**described(1, soon), "associations": 1}, {**described(2, "unreadable")}]
    (family,) = PeerExpiry("x", lambda: entries).collect()
    (sample,) = family.samples
    assert sample.labels == {"sha256": described(1)["sha256"], "cn": "peer 1"}
    assert abs(sample.value - 5 * 86400) < 5


@given(JSON)
@settings(max_examples=300)
def test_the_terminal_text_of_any_document_has_no_control_character(doc: Any) -> None:
    text = as_text(doc)
    assert all(ch.isprintable() or ch == "\n" for ch in text)


@given(st.text(), st.text())
@settings(max_examples=300)
def test_no_value_can_end_the_page_s_script_or_open_markup(ae: str, subject: str) -> None:
    doc = {"associations": [{"calling_ae": ae, "peer_subject": subject}], "proxy": {}}
    page = render_page(doc).decode()
    data = page.split('<script type="application/json" id="data">', 1)[1].split("</script>")[0]
    assert "<" not in data and ">" not in data and "&" not in data
    assert json.loads(data) == doc
    assert page.count("<script") == 2 and page.count("</script>") == 2


@given(st.lists(JSON, max_size=3), st.lists(st.booleans(), min_size=3, max_size=3))
def test_the_workers_boards_merge_whatever_a_file_holds(
    boards: list[Any], alive: list[bool]
) -> None:
    doc = merge_boards(boards, alive)
    assert set(doc) >= {"listeners", "routes", "associations", "recent_refusals", "certificates"}
    assert len(doc["recent_refusals"]) <= 100


def test_the_workers_boards_are_summed_per_route_and_the_newest_refusals_kept() -> None:
    def board(worker: int, now: int, total: int, ts: list[str]) -> dict[str, Any]:
        return {
            "routes": [
                {"name": "CT", "associations_now": now, "associations_total": total},
                {"name": "_other", "associations_total": 1, "refusals_total": 1},
            ],
            "associations": [{"calling_ae": f"W{worker}", "started": str(worker)}] * now,
            "recent_refusals": [{"ts": t, "worker": worker} for t in ts],
        }

    doc = merge_boards(
        [board(0, 2, 5, ["b", "d"]), board(1, 1, 3, ["a", "c"]), board(2, 4, 4, ["e"])],
        [True, True, False],
    )
    ct, other = doc["routes"]
    assert ct == {
        "name": "CT",
        "associations_now": 3,
        "associations_total": 12,
        "refusals_total": 0,
    }
    assert other == {
        "name": "_other",
        "associations_now": 0,
        "associations_total": 3,
        "refusals_total": 3,
    }
    assert [a["calling_ae"] for a in doc["associations"]] == ["W0", "W0", "W1"]
    assert [r["ts"] for r in doc["recent_refusals"]] == ["e", "d", "c", "b", "a"]
