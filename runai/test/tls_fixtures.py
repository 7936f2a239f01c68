"""Certificates made on the fly for TLS tests: self-signed, like docs/tls.md's
``openssl req -x509`` one, written to a test's temporary folder."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import endpoints


def make_certificate(folder, names=("localhost",), ips=("127.0.0.1",), stem="server"):
    """``(key_path, cert_path)``: a new P-256 key and a self-signed certificate for
    ``names`` (DNS) and ``ips``, as ``<stem>-key.pem`` and ``<stem>-cert.pem`` in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else ips[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    subject_key = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    alternative = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(subject_key, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = (os.path.join(folder, f"{stem}-{kind}.pem") for kind in ("key", "cert"))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def ssl_endpoint(key_path, cert_path, port=0):
    """The ``ssl:`` server endpoint description for a key and certificate, on 127.0.0.1."""
    key, cert = (endpoints.quoteStringArgument(path) for path in (key_path, cert_path))
    return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
