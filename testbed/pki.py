"""Every key and certificate the testbed's services present or trust, made once per testbed.

Layout under ``<dir>/pki``: ``ca.pem`` (TLS root that clients trust via CONFINFER_CA_BUNDLE),
``tls.pem``/``tls.key`` (served by MAA and Key Vault for 127.0.0.1 and localhost), and one pair
per issuer role: ``vtpm-ca`` (issues AK certificates), ``ark``/``ask``/``vcek`` (the AMD chain,
ECDSA P-384), ``maa-signing`` (RS256 token signer, in MAA's JWKS with x5c), ``kv-signing``
(signs SKR JWS responses, x5c), ``aad-signing`` (signs managed-identity access tokens).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pair:
    """A private key and the certificate for it."""

    key: PrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def p384_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confinfer testbed"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def issue(
    cn: str,
    key: PrivateKey,
    issuer: Pair | None = None,
    *,
    ca: bool = False,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = 365,
    not_before: dt.datetime | None = None,
) -> Pair:
    """Issue a certificate for ``key``; self-signed when ``issuer`` is None."""
    now = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    if ips or dns:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = hashes.SHA384() if isinstance(signer_key, ec.EllipticCurvePrivateKey) else (
        hashes.SHA256()
    )
    cert = builder.sign(signer_key, algorithm)
    return Pair(key, cert)


@dataclass(frozen=True)
class Trust:
    """All the testbed's keys and certificates."""

    ca: Pair
    tls: Pair
    vtpm_ca: Pair
    ark: Pair
    ask: Pair
    vcek: Pair
    maa_signing: Pair
    kv_signing: Pair
    aad_signing: Pair

    ROLES = ("ca", "tls", "vtpm_ca", "ark", "ask", "vcek", "maa_signing", "kv_signing",
             "aad_signing")

    @classmethod
    def create(cls) -> Trust:
        ca = issue("testbed TLS root CA", rsa_key(), ca=True, days=3650)
        tls = issue("testbed services", rsa_key(), ca, ips=("127.0.0.1", "::1"),
                    dns=("localhost",))
        vtpm_ca = issue("testbed Global Virtual TPM CA - 03", rsa_key(), ca=True, days=3650)
        ark = issue("ARK-Milan (testbed)", p384_key(), ca=True, days=3650)
        ask = issue("SEV-Milan (testbed)", p384_key(), ark, ca=True, days=3650)
        vcek = issue("SEV-VCEK (testbed)", p384_key(), ask)
        maa_signing = issue("testbed MAA signing", rsa_key(), ca)
        kv_signing = issue("testbed Key Vault SKR signing", rsa_key(), ca)
        aad_signing = issue("testbed AAD token signing", rsa_key(), ca)
        return cls(ca, tls, vtpm_ca, ark, ask, vcek, maa_signing, kv_signing, aad_signing)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for role in self.ROLES:
            pair: Pair = getattr(self, role)
            stem = role.replace("_", "-")
            (directory / f"{stem}.pem").write_bytes(pair.cert_pem)
            key_path = directory / f"{stem}.key"
            key_path.touch(mode=0o600)
            key_path.write_bytes(pair.key_pem)

    @classmethod
    def load(cls, directory: Path) -> Trust:
        pairs = {}
        for role in cls.ROLES:
            stem = role.replace("_", "-")
            cert = x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())
            key = serialization.load_pem_private_key(
                (directory / f"{stem}.key").read_bytes(), password=None
            )
            assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)  # noqa: S101
            pairs[role] = Pair(key, cert)
        return cls(**pairs)
