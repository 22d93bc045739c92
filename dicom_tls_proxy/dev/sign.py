"""Signatures the development PKI needs and cryptography refuses to make: by hand, in DER.

Why this exists: cryptography 50 (measured) refuses SHA-1 and MD5 for certificate signatures ("Hash
algorithm "sha1" not supported for signatures"), and verify_directly_issued_by refuses to check one
("Unsupported signature algorithm"), but it still signs arbitrary bytes with SHA-1. Tests need
SHA-1-signed certificates to check that the TLS layer refuses them, so such a certificate is built
by signing with SHA-256, swapping the signature AlgorithmIdentifier in the TBS bytes, and signing
those bytes with SHA-1. Likewise it requires a CRL's nextUpdate, and the field carries CRLs without
one. Only the DER needed for that is written here; `devpki` is its one user.

What it must never do: be imported by the proxy itself (it is part of the development PKI, for
``certs init``, the tests and the demo, not of the production API surface); parse DER it did not
get from cryptography a moment before (it trusts the structure it splits: no length checks).
"""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

# AlgorithmIdentifier DER for sha1WithRSAEncryption (1.2.840.113549.1.1.5, NULL parameters) and
# ecdsa-with-SHA1 (1.2.840.10045.4.1, no parameters).
_SHA1_WITH_RSA: Final = bytes.fromhex("300d06092a864886f70d0101050500")
_ECDSA_WITH_SHA1: Final = bytes.fromhex("300906072a8648ce3d0401")


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def _der_read(data: bytes, offset: int) -> tuple[int, int, int]:
    """Return (tag, start of value, end of value) of the DER element at offset."""
    tag = data[offset]
    first = data[offset + 1]
    if first < 0x80:
        return tag, offset + 2, offset + 2 + first
    count = first & 0x7F
    length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    start = offset + 2 + count
    return tag, start, start + length


def _der_children(data: bytes) -> list[bytes]:
    """Split the content of the single SEQUENCE in data into its encoded children."""
    _, start, end = _der_read(data, 0)
    children = []
    offset = start
    while offset < end:
        value_end = _der_read(data, offset)[2]
        children.append(data[offset:value_end])
        offset = value_end
    return children


def _raw_sign(
    key: CertificateIssuerPrivateKeyTypes, data: bytes, hash_alg: hashes.HashAlgorithm
) -> bytes:
    """Sign bytes the way X.509 does for RSA (PKCS#1 v1.5) and ECDSA keys."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hash_alg)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hash_alg))
    raise ValueError("this signature is only made with RSA or ECDSA keys")


def _signed_der(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """Certificate / CertificateList ::= SEQUENCE { tbs, signatureAlgorithm, BIT STRING }."""
    return _der_tlv(0x30, tbs + algorithm + _der_tlv(0x03, b"\x00" + signature))


def sign_sha1(
    cert: x509.Certificate, issuer_key: CertificateIssuerPrivateKeyTypes
) -> x509.Certificate:
    """The certificate (signed by `issuer_key` with any hash) signed again with SHA-1."""
    algorithm = _SHA1_WITH_RSA if isinstance(issuer_key, rsa.RSAPrivateKey) else _ECDSA_WITH_SHA1
    children = _der_children(cert.tbs_certificate_bytes)
    # TBSCertificate: [0] version (optional), serialNumber, signature AlgorithmIdentifier, ...
    index = 2 if children[0][0] == 0xA0 else 1
    children[index] = algorithm
    tbs = _der_tlv(0x30, b"".join(children))
    signature = _raw_sign(issuer_key, tbs, hashes.SHA1())
    return x509.load_der_x509_certificate(_signed_der(tbs, algorithm, signature))


def without_next_update(
    crl: x509.CertificateRevocationList, issuer_key: CertificateIssuerPrivateKeyTypes
) -> x509.CertificateRevocationList:
    """The CRL with its nextUpdate removed and signed again (cryptography requires nextUpdate)."""
    certificate_list = _der_children(crl.public_bytes(serialization.Encoding.DER))
    fields = _der_children(certificate_list[0])
    # TBSCertList: version, signature, issuer, thisUpdate, nextUpdate (optional), ...; the two
    # times are the only UTCTime (0x17) / GeneralizedTime (0x18) elements at this level.
    times = [index for index, child in enumerate(fields) if child[0] in (0x17, 0x18)]
    del fields[times[1]]
    tbs = _der_tlv(0x30, b"".join(fields))
    signature = _raw_sign(issuer_key, tbs, hashes.SHA256())
    return x509.load_der_x509_crl(_signed_der(tbs, certificate_list[1], signature))
