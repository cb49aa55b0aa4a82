"""The coordinator's TLS material: a CA and a SuperLink certificate made with `cryptography`, or the operator's own.

The SuperLink serves Fleet, Control and Runtime APIs on one HTTPS port with one certificate, and its own
SuperExec dials it as 127.0.0.1:PORT: a certificate without 127.0.0.1 among its names leaves every run
`pending` without an error. So the certificate's subject alternative names are always 127.0.0.1, localhost and
::1, plus the host names devices dial; an operator's certificate without 127.0.0.1 is refused here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CA_DAYS, SERVER_DAYS = 3650, 825


def _name(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        return x509.DNSName(text)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_server(hosts: Iterable[str]) -> dict[str, bytes]:
    """{"ca.crt", "ca.key", "server.pem", "server.key"}: a CA and a server certificate it signed, whose names are
    the loopback ones and `hosts`."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bouquet coordinator CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    names = list(dict.fromkeys([*LOOPBACK, *hosts]))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bouquet superlink")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
           .add_extension(x509.SubjectAlternativeName([_name(n) for n in names]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return {"ca.crt": ca.public_bytes(pem), "ca.key": _pem_key(ca_key),
            "server.pem": srv.public_bytes(pem), "server.key": _pem_key(srv_key)}


def certificate_names(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san]


def check_operator_files(cert: Path, key: Path, ca: Path) -> dict[str, bytes]:
    """The operator's own certificate, key and CA, read and checked: the certificate names 127.0.0.1, the key
    is its key, the CA signed it."""
    data = {"server.pem": cert.read_bytes(), "server.key": key.read_bytes(), "ca.crt": ca.read_bytes()}
    server = x509.load_pem_x509_certificate(data["server.pem"])
    names = certificate_names(data["server.pem"])
    if "127.0.0.1" not in names:
        raise ValueError(f"{cert} does not name 127.0.0.1 (it names {names or 'nothing'}): the SuperLink dials "
                         f"itself there, and its runs would stay pending; add IP:127.0.0.1 to its names")
    private = serialization.load_pem_private_key(data["server.key"], password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.DER, spki)
            != server.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ValueError(f"{key} is not the private key of {cert}")
    authority = x509.load_pem_x509_certificate(data["ca.crt"])
    try:
        server.verify_directly_issued_by(authority)
    except (ValueError, TypeError, Exception) as err:  # InvalidSignature has no message
        raise ValueError(f"{cert} is not signed by the CA in {ca}: {err or type(err).__name__}") from None
    return data
