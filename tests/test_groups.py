"""Key exchange groups, real TLS on loopback: `groups` in a `[tls.NAME]` table (checked by name,
applied by OpenSSL), and the proxy as a client learning the group an upstream chose, so that an
upstream that takes neither of OpenSSL's default key shares (X25519MLKEM768, X25519) answers
with a HelloRetryRequest once, not on every association.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

from dicom_tls_proxy.config import tls_table
from dicom_tls_proxy.config.load import ConfigError, load_config
from dicom_tls_proxy.config.schema import TLS_GROUPS
from dicom_tls_proxy.protocol import pdu
from dicom_tls_proxy.transport import _openssl, sessions
from tests.support import (
    ScriptedUpstream,
    build_ac,
    pacs_ssl_context,
    plaintext_association,
    proxy_config,
    running_proxy,
    tls_in,
    tls_origination_config,
    toml_dumps,
)


def test_every_known_group_is_one_openssl_takes() -> None:
    """`TLS_GROUPS` (what `check` accepts) against the installed OpenSSL: one fact, held true."""
    for name in TLS_GROUPS:
        _openssl.set_groups(SSL.Context(SSL.TLS_METHOD), name)
    _openssl.set_groups(SSL.Context(SSL.TLS_METHOD), ":".join(sessions.DEFAULT_GROUPS))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("P-265", "unknown or refused group 'P-265'"),
        ("X25519:secp192r1", "unknown or refused group 'secp192r1'"),
        ("X25519::P-256", "unknown or refused group ''"),
        ("*X25519:*P-256:*P-384:*P-521:*X448", "more than 4 key shares"),
    ],
)
def test_a_bad_group_names_the_key_and_file(
    tmp_path: Path, pki: Path, value: str, problem: str
) -> None:
    path = tmp_path / "p.toml"
    config = proxy_config(pki, "127.0.0.1:11112", tls={"in": tls_in(pki, groups=value)})
    path.write_text(toml_dumps(config))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: tls.in.groups: " in str(caught.value) and problem in str(caught.value)


@pytest.mark.parametrize("value", ["P-256", "x25519mlkem768:X25519:P-256", "*X25519/*P-384:P-521"])
def test_good_groups_load(tmp_path: Path, pki: Path, value: str) -> None:
    path = tmp_path / "p.toml"
    config = proxy_config(pki, "127.0.0.1:11112", tls={"in": tls_in(pki, groups=value)})
    path.write_text(toml_dumps(config))
    assert load_config(path).tls["in"].groups == value


class OneGroupPacs(ScriptedUpstream):
    """A TLS 1.3 PACS that takes P-256 only (as DCMTK's BCP 195 profile) and counts the
    ClientHellos of each connection: two when it had to ask for another key share."""

    def __init__(self, pki: Path) -> None:
        self.hellos: list[int] = []
        self._lock = threading.Lock()
        ctx = pacs_ssl_context(pki)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_ecdh_curve("prime256v1")
        ctx._msg_callback = self._message  # type: ignore[attr-defined]  # stdlib debug hook
        self._current = 0
        super().__init__(self.serve, tls=ctx)

    def _message(
        self, conn: Any, direction: str, version: Any, kind: Any, msg: Any, data: Any
    ) -> None:
        if direction == "read" and kind == ssl._TLSContentType.HANDSHAKE and msg == 1:  # type: ignore[attr-defined]
            with self._lock:
                self._current += 1

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.hellos.append(self._current)
            self._current = 0
        rq = self.read_pdu(conn)
        conn.sendall(build_ac(rq))
        self.read_pdu(conn)
        conn.sendall(pdu.encode_release_rp())


@pytest.mark.parametrize("tickets", [True, False])
def test_the_proxy_learns_the_group_its_upstream_chose(
    tmp_path: Path, pki: Path, tickets: bool
) -> None:
    pacs = OneGroupPacs(pki)
    try:
        config = tls_origination_config(pacs.address, pki, session_tickets=tickets)
        with running_proxy(tmp_path, config) as proxy:
            for _ in range(3):
                assert plaintext_association(proxy.address("in"))[0] == pdu.A_ASSOCIATE_AC
        assert pacs.hellos == [2, 1, 1], pacs.hellos  # a HelloRetryRequest the first time only
        assert not pacs.errors, pacs.errors
    finally:
        pacs.close()


def test_groups_key_is_what_the_proxy_offers(tmp_path: Path, pki: Path) -> None:
    """`groups = "P-384"` towards a P-256-only upstream: no group in common, the handshake
    fails (the route's answer is a refusal), so the key reached OpenSSL."""
    refusing, pacs = OneGroupPacs(pki), OneGroupPacs(pki)
    try:
        with running_proxy(
            tmp_path, tls_origination_config(refusing.address, pki, groups="P-384")
        ) as proxy:
            assert plaintext_association(proxy.address("in"))[0] != pdu.A_ASSOCIATE_AC
        with running_proxy(
            tmp_path, tls_origination_config(pacs.address, pki, groups="P-384:P-256")
        ) as proxy:
            for _ in range(2):
                assert plaintext_association(proxy.address("in"))[0] == pdu.A_ASSOCIATE_AC
        assert pacs.hellos == [2, 2]  # the operator's list as written: nothing learnt
    finally:
        refusing.close()
        pacs.close()


@given(
    st.lists(
        st.tuples(st.sampled_from(TLS_GROUPS), st.booleans(), st.sampled_from([":", "/"])),
        min_size=1,
        max_size=6,
    )
)
def test_any_list_of_known_groups_loads_and_openssl_takes_it(
    parts: list[tuple[str, bool, str]],
) -> None:
    stars = iter(range(tls_table.MAX_KEY_SHARES))
    value = "".join(
        ("*" if star and next(stars, None) is not None else "") + name + sep
        for name, star, sep in parts
    )[:-1]
    assert tls_table._groups(value) == value
    _openssl.set_groups(SSL.Context(SSL.TLS_METHOD), value)


@given(st.text(max_size=40))
def test_any_text_loads_or_is_refused_with_a_reason(value: str) -> None:
    try:
        tls_table._groups(value)
    except ValueError as exc:
        assert "group" in str(exc)
