"""Every key and certificate the testbed's services present or trust, made once per testbed.

Layout under ``<dir>/pki`` (``.pem`` certificate, ``.key`` private key):

- ``ca``: the TLS root that clients trust via CONFINFER_CA_BUNDLE (self-signed);
- ``tls-issuing``: the "TLS issuing CA" under that root (pathlen 0) that issues every TLS
  server certificate, as Microsoft's "Azure RSA TLS Issuing CA" issues Key Vault's;
- ``tls``: MAA's TLS server certificate; ``kv-tls``: Key Vault's TLS service certificate, which
  also signs Secure Key Release answers (as Key Vault's shared TLS certificate does); both for
  127.0.0.1, ::1 and localhost. ``kv-tls-foreign``: a valid certificate from the same chain for
  another host (``evil.example``), for the "signed for another host" fault. These three
  ``.pem`` files hold the leaf followed by ``tls-issuing``: what a server presents;
- ``vtpm-ca`` (issues AK certificates), ``ark``/``ask``/``vcek`` (the AMD chain, ECDSA P-384),
  ``maa-signing`` (RS256 token signer, in MAA's JWKS with x5c), ``aad-signing`` (signs
  managed-identity access tokens), ``kv-signing`` (an older release signer; releases no longer
  use it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def _key_usage(*on: str) -> x509.KeyUsage:
    """A KeyUsage extension with exactly the named bits set."""
    bits = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    assert set(on) <= set(bits)  # noqa: S101 - a typo here is a testbed bug
    return x509.KeyUsage(**{bit: bit in on for bit in bits})


_CA_USAGE = _key_usage("digital_signature", "key_cert_sign", "crl_sign")
_ISSUING_CA_USAGE = _key_usage("key_cert_sign", "crl_sign")
_TLS_SERVER_USAGE = _key_usage("digital_signature", "key_encipherment")
TLS_HOSTS_IP = ("127.0.0.1", "::1")
TLS_HOSTS_DNS = ("localhost",)
FOREIGN_HOST = "evil.example"


def issue(
    cn: str,
    key: PrivateKey,
    issuer: Pair | None = None,
    *,
    ca: bool = False,
    path_length: int | None = None,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = 365,
    not_before: dt.datetime | None = None,
    key_usage: x509.KeyUsage | None = None,
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = (),
) -> Pair:
    """Issue a certificate for ``key``; self-signed when ``issuer`` is None.

    Every certificate carries a SubjectKeyIdentifier, and one with an issuer an
    AuthorityKeyIdentifier. A CA gets keyCertSign/cRLSign unless ``key_usage`` says otherwise.
    """
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
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    usage = key_usage if key_usage is not None else (_CA_USAGE if ca else None)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    if ips or dns:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = (
        hashes.SHA384() if isinstance(signer_key, ec.EllipticCurvePrivateKey) else (hashes.SHA256())
    )
    cert = builder.sign(signer_key, algorithm)
    return Pair(key, cert)


def tls_server(
    cn: str,
    issuing_ca: Pair,
    *,
    ips: tuple[str, ...] = TLS_HOSTS_IP,
    dns: tuple[str, ...] = TLS_HOSTS_DNS,
) -> Pair:
    """A TLS service certificate shaped like Azure's: RSA-2048, KU digitalSignature and
    keyEncipherment, EKU serverAuth and clientAuth, CA:FALSE, SKI/AKI, the hosts in its SAN."""
    return issue(
        cn,
        rsa_key(),
        issuing_ca,
        ips=ips,
        dns=dns,
        key_usage=_TLS_SERVER_USAGE,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    )


@dataclass(frozen=True)
class Trust:
    """All the testbed's keys and certificates."""

    ca: Pair
    tls_issuing: Pair
    tls: Pair
    kv_tls: Pair
    kv_tls_foreign: Pair
    vtpm_ca: Pair
    ark: Pair
    ask: Pair
    vcek: Pair
    maa_signing: Pair
    kv_signing: Pair
    aad_signing: Pair

    ROLES = (
        "ca",
        "tls_issuing",
        "tls",
        "kv_tls",
        "kv_tls_foreign",
        "vtpm_ca",
        "ark",
        "ask",
        "vcek",
        "maa_signing",
        "kv_signing",
        "aad_signing",
    )
    # TLS leaves: their .pem files hold the leaf, then the issuing CA (what servers present).
    CHAINED = ("tls", "kv_tls", "kv_tls_foreign")

    @classmethod
    def create(cls) -> Trust:
        ca = issue("testbed TLS root CA", rsa_key(), ca=True, days=3650)
        tls_issuing = issue(
            "testbed RSA TLS Issuing CA 01",
            rsa_key(),
            ca,
            ca=True,
            path_length=0,
            days=1825,
            key_usage=_ISSUING_CA_USAGE,
        )
        tls = tls_server("testbed services", tls_issuing)
        kv_tls = tls_server("testbed Key Vault", tls_issuing)
        kv_tls_foreign = tls_server(FOREIGN_HOST, tls_issuing, ips=(), dns=(FOREIGN_HOST,))
        vtpm_ca = issue("testbed Global Virtual TPM CA - 03", rsa_key(), ca=True, days=3650)
        ark = issue("ARK-Milan (testbed)", p384_key(), ca=True, days=3650)
        ask = issue("SEV-Milan (testbed)", p384_key(), ark, ca=True, days=3650)
        vcek = issue("SEV-VCEK (testbed)", p384_key(), ask)
        maa_signing = issue("testbed MAA signing", rsa_key(), ca)
        kv_signing = issue("testbed Key Vault SKR signing", rsa_key(), ca)
        aad_signing = issue("testbed AAD token signing", rsa_key(), ca)
        return cls(
            ca,
            tls_issuing,
            tls,
            kv_tls,
            kv_tls_foreign,
            vtpm_ca,
            ark,
            ask,
            vcek,
            maa_signing,
            kv_signing,
            aad_signing,
        )

    def chain(self, role: str) -> tuple[Pair, Pair, Pair]:
        """A TLS leaf's certificate path, leaf first: the leaf, the issuing CA, the root."""
        if role not in self.CHAINED:
            raise ValueError(f"{role!r} is not a TLS leaf ({', '.join(self.CHAINED)})")
        return (getattr(self, role), self.tls_issuing, self.ca)

    def chain_pem(self, role: str) -> bytes:
        """What a TLS server presents for ``role``: the leaf, then the issuing CA."""
        pair: Pair = getattr(self, role)
        if role in self.CHAINED:
            return pair.cert_pem + self.tls_issuing.cert_pem
        return pair.cert_pem

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for role in self.ROLES:
            pair: Pair = getattr(self, role)
            stem = role.replace("_", "-")
            (directory / f"{stem}.pem").write_bytes(self.chain_pem(role))
            key_path = directory / f"{stem}.key"
            key_path.touch(mode=0o600)
            key_path.write_bytes(pair.key_pem)

    @classmethod
    def load(cls, directory: Path) -> Trust:
        return cls(**{role: load_pair(directory, role) for role in cls.ROLES})


def load_pair(directory: Path, role: str) -> Pair:
    """One role's pair from a saved trust directory (``role`` as in ``Trust.ROLES``)."""
    if role not in Trust.ROLES:
        raise ValueError(f"unknown trust role {role!r}")
    stem = role.replace("_", "-")
    # a chained file's first certificate is the leaf
    cert = x509.load_pem_x509_certificates((directory / f"{stem}.pem").read_bytes())[0]
    # The testbed's own keys, made by Trust.create: skipping the (slow) RSA key consistency
    # check makes loading them some forty times faster.
    key = serialization.load_pem_private_key(
        (directory / f"{stem}.key").read_bytes(),
        password=None,
        unsafe_skip_rsa_key_validation=True,
    )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / stem}.key: not an RSA or EC private key")
    return Pair(key, cert)
