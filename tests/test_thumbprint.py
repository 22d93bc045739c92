"""Thumbprints: equal to what openssl prints, and parsed from whatever operators paste."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from dicom_tls_proxy.dev import pki as devpki
from dicom_tls_proxy.security import certload
from dicom_tls_proxy.security.thumbprint import (
    Thumbprint,
    certificate_thumbprints,
    matches_any,
    parse_thumbprint,
)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

SHA256_HEX = "5f2b0a9c4e7d8f1a3b6c9e0d2f4a7b8c1d3e5f607182939a4b5c6d7e8f901a2b"
SHA1_HEX = "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3"


def openssl(*args: str | Path) -> str:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def openssl_fingerprint(pem: Path, algorithm: str) -> str:
    """Lowercase hex of ``openssl x509 -noout -fingerprint -<algorithm>`` for a PEM certificate."""
    line = openssl("x509", "-in", pem, "-noout", "-fingerprint", f"-{algorithm}").strip()
    label, _, value = line.partition("=")
    assert label.lower() == f"{algorithm} fingerprint", line
    return value.replace(":", "").lower()


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, x509.Certificate]:
    """A CA-signed certificate and its key as PEM files; returns (folder, certificate)."""
    folder = tmp_path_factory.mktemp("thumbprint")
    ca_key, ca_cert = devpki.make_ca("thumbprint CA")
    key, cert = devpki.make_leaf(ca_key, ca_cert, "device", dns=["device"])
    devpki.write_pem_cert(folder / "cert.pem", cert)
    devpki.write_pem_key(folder / "key.pem", key)
    devpki.write_pem_cert(folder / "ca.pem", ca_cert)
    return folder, cert


# --- against the openssl CLI -------------------------------------------------------------------


@needs_openssl
def test_pem_and_der_match_openssl(cert_files: tuple[Path, x509.Certificate]) -> None:
    folder, cert = cert_files
    expected = {alg: openssl_fingerprint(folder / "cert.pem", alg) for alg in ("sha256", "sha1")}
    openssl("x509", "-in", folder / "cert.pem", "-outform", "DER", "-out", folder / "cert.der")
    for path in (folder / "cert.pem", folder / "cert.der"):
        (loaded,) = certload.load_certificates(path)
        sha256, sha1 = certificate_thumbprints(loaded)
        assert str(sha256) == f"sha256:{expected['sha256']}"
        assert str(sha1) == f"sha1:{expected['sha1']}"
        der = (folder / "cert.der").read_bytes()
        assert matches_any(der, [sha256]) == sha256
        assert matches_any(der, [sha1]) == sha1
    assert certificate_thumbprints(cert)[0].digest.hex() == expected["sha256"]


@needs_openssl
@pytest.mark.parametrize("legacy", [False, True], ids=["aes", "legacy"])
@pytest.mark.parametrize("password", ["", "correct horse"], ids=["no-password", "password"])
def test_pkcs12_matches_openssl(
    cert_files: tuple[Path, x509.Certificate], legacy: bool, password: str
) -> None:
    folder, _ = cert_files
    p12 = folder / f"bundle-{legacy}-{bool(password)}.p12"
    openssl(
        "pkcs12",
        "-export",
        *(["-legacy"] if legacy else []),
        "-in",
        folder / "cert.pem",
        "-inkey",
        folder / "key.pem",
        "-certfile",
        folder / "ca.pem",
        "-passout",
        f"pass:{password}",
        "-out",
        p12,
    )
    certificates = certload.load_certificates(p12, password.encode() if password else None)
    assert len(certificates) == 2  # the leaf first, then the CA
    sha256, sha1 = certificate_thumbprints(certificates[0])
    assert sha256.digest.hex() == openssl_fingerprint(folder / "cert.pem", "sha256")
    assert sha1.digest.hex() == openssl_fingerprint(folder / "cert.pem", "sha1")


@needs_openssl
def test_parses_openssl_output_line(cert_files: tuple[Path, x509.Certificate]) -> None:
    folder, cert = cert_files
    for algorithm, index in (("sha256", 0), ("sha1", 1)):
        line = openssl(
            "x509", "-in", folder / "cert.pem", "-noout", "-fingerprint", f"-{algorithm}"
        )
        assert parse_thumbprint(line) == certificate_thumbprints(cert)[index]


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        SHA256_HEX,
        SHA256_HEX.upper(),
        f"sha256:{SHA256_HEX}",
        f"SHA256:{SHA256_HEX.upper()}",
        f"Sha-256:{SHA256_HEX}",
        ":".join(SHA256_HEX[i : i + 2] for i in range(0, 64, 2)).upper(),
        " ".join(SHA256_HEX[i : i + 2] for i in range(0, 64, 2)),
        f"  sha256: {SHA256_HEX}\n",
        # What Windows' certificate dialog copies: a left-to-right mark before the digits.
        "\u200e" + " ".join(SHA256_HEX[i : i + 2] for i in range(0, 64, 2)).upper(),
        "\ufeff" + SHA256_HEX,
        "\u00a0".join(SHA256_HEX[i : i + 4] for i in range(0, 64, 4)),
        "\u200e" + SHA256_HEX[:10] + "\u200b" + SHA256_HEX[10:] + "\u200f",
        "sha256 Fingerprint=" + ":".join(SHA256_HEX[i : i + 2] for i in range(0, 64, 2)).upper(),
    ],
)
def test_parse_sha256_variants(text: str) -> None:
    parsed = parse_thumbprint(text)
    assert parsed == Thumbprint("sha256", bytes.fromhex(SHA256_HEX))
    assert str(parsed) == f"sha256:{SHA256_HEX}"


@pytest.mark.parametrize(
    "text",
    [
        SHA1_HEX,
        f"sha1:{SHA1_HEX}",
        f"SHA-1:{SHA1_HEX.upper()}",
        "\u200e" + " ".join(SHA1_HEX[i : i + 2] for i in range(0, 40, 2)),
        "SHA1 Fingerprint=" + ":".join(SHA1_HEX[i : i + 2] for i in range(0, 40, 2)).upper(),
    ],
)
def test_parse_sha1_variants(text: str) -> None:
    assert parse_thumbprint(text) == Thumbprint("sha1", bytes.fromhex(SHA1_HEX))
    assert str(parse_thumbprint(text)) == f"sha1:{SHA1_HEX}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"sha256:{SHA256_HEX[:-1]}", "expected 64 hex digits for sha256, got 63"),
        (f"sha1:{SHA256_HEX}", "expected 40 hex digits for sha1, got 64"),
        (f"sha256:{SHA1_HEX}", "expected 64 hex digits for sha256, got 40"),
        (SHA256_HEX[:-2], "expected 64 hex digits (sha256) or 40 (sha1), got 62"),
        (SHA256_HEX + "0", "expected 64 hex digits (sha256) or 40 (sha1), got 65"),
        (SHA256_HEX[:-1] + "g", "not a hex digit in the thumbprint: 'g'"),
        (SHA256_HEX[:-1] + "\u00e9", "not a hex digit in the thumbprint: 'é' (U+00E9)"),
        (SHA256_HEX[:-1] + "\x00", "not a hex digit in the thumbprint: U+0000"),
        (f"md5:{SHA1_HEX[:32]}", "unsupported thumbprint algorithm 'md5'"),
        (f"sha384:{SHA256_HEX}", "unsupported thumbprint algorithm 'sha384'"),
        ("", "empty thumbprint"),
        (" \u200e\u00a0", "empty thumbprint"),
        ("sha256:", "expected 64 hex digits for sha256, got 0"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_thumbprint(text)
    assert str(caught.value).startswith(message)


def test_thumbprint_checks_digest_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Thumbprint("sha256", b"\x00" * 20)
    with pytest.raises(ValueError, match="unsupported"):
        Thumbprint("md5", b"\x00" * 16)  # type: ignore[arg-type]
    thumbprint = Thumbprint("sha1", b"\x01" * 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        thumbprint.digest = b""  # type: ignore[misc]
    assert not hasattr(thumbprint, "__dict__")  # slots


# --- matching ----------------------------------------------------------------------------------


def test_matches_any() -> None:
    _, cert = devpki.make_self_signed("device")
    _, other = devpki.make_self_signed("other")
    der = cert.public_bytes(Encoding.DER)
    sha256, sha1 = certificate_thumbprints(cert)
    other_sha256, other_sha1 = certificate_thumbprints(other)
    assert matches_any(der, []) is None
    assert matches_any(der, [other_sha256, other_sha1]) is None
    assert matches_any(der, [other_sha256, sha1, other_sha1]) == sha1
    assert matches_any(der, [other_sha1, sha256, sha1]) == sha256  # the first that matches
    assert matches_any(der, iter([sha256])) == sha256  # any iterable


def test_matches_any_checks_every_candidate() -> None:
    _, cert = devpki.make_self_signed("device")
    sha256, _ = certificate_thumbprints(cert)
    seen: list[Thumbprint] = []

    def candidates() -> list[Thumbprint]:
        return [sha256, Thumbprint("sha1", b"\x00" * 20), Thumbprint("sha256", b"\x00" * 32)]

    def recording() -> Iterator[Thumbprint]:
        for candidate in candidates():
            seen.append(candidate)
            yield candidate

    assert matches_any(cert.public_bytes(Encoding.DER), recording()) == sha256
    assert seen == candidates()


# --- properties --------------------------------------------------------------------------------

thumbprints = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda digest: Thumbprint("sha256", digest)),
    st.binary(min_size=20, max_size=20).map(lambda digest: Thumbprint("sha1", digest)),
)


@given(thumbprints)
def test_round_trip(thumbprint: Thumbprint) -> None:
    assert parse_thumbprint(str(thumbprint)) == thumbprint
    assert str(parse_thumbprint(str(thumbprint))) == str(thumbprint)


@st.composite
def formatted(draw: st.DrawFn) -> tuple[Thumbprint, str]:
    """A thumbprint and one way of writing it: case, separators and invisible characters mixed."""
    thumbprint = draw(thumbprints)
    pieces: list[str] = []
    if draw(st.booleans()):
        prefix = draw(st.sampled_from([f"{thumbprint.algorithm}:", "sha-256:", "sha-1:"]))
        if prefix.replace("-", "") == f"{thumbprint.algorithm}:":
            pieces.append("".join(draw(st.sampled_from([c.lower(), c.upper()])) for c in prefix))
    junk = st.sampled_from([":", " ", "\u00a0", "\u200e", "\ufeff", "\u200b", "\t", ""])
    pieces.append(draw(junk))
    for char in thumbprint.digest.hex():
        pieces.append(char.upper() if draw(st.booleans()) else char)
        pieces.append(draw(junk))
    return thumbprint, "".join(pieces)


@given(formatted())
def test_any_formatting_parses_to_the_same_digest(case: tuple[Thumbprint, str]) -> None:
    thumbprint, text = case
    assert parse_thumbprint(text) == thumbprint
