# -*- test-case-name: runai.test.test_tls -*-
"""TLS at both ends. The server's ``ssl:`` endpoint is checked at start, so that a key or
certificate that cannot serve is one line and an exit rather than a server that never
listens. The clients verify the server's certificate and its host name, against the
system's trust store or a CA file (a self-signed server's own certificate); a handshake
that fails is a :class:`TLSError`, never a fallback to plain TCP.

Only ``ssl`` and ``socket`` at import: cryptography and pyOpenSSL (Twisted's ``tls``
extra) are imported when TLS is asked for.
"""

import os
import re
import socket
import ssl

# A TLS server answers a ClientHello at once; a plain runai server waits for the rest of a
# packet that never comes. Past this many seconds the client gives up, and says why.
HANDSHAKE_TIMEOUT = 10.0

# The arguments of an ssl: server endpoint, in the order Twisted takes them positionally.
SSL_ARGUMENTS = ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
                 "dhParameters")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_NEED_TLS_EXTRA = "TLS needs pyOpenSSL and cryptography: install runai again (pip install -e .)"


class TLSError(ConnectionError):
    """A TLS connection that could not be made safely, said in one line."""


def endpoint_arguments(description):
    """``(args, kwargs)`` of a Twisted endpoint description, split as Twisted splits it:
    ``:`` between arguments, the first ``=`` of one names it, a backslash escapes."""
    args, kwargs, parts, current = [], {}, [], []

    def end_argument():
        parts.append("".join(current))
        if len(parts) == 1:
            args.append(parts[0])
        else:
            kwargs[parts[0]] = parts[1]

    characters = iter(description)
    for c in characters:
        if c == "\\":
            current.append(next(characters, ""))
        elif c == ":":
            end_argument()
            parts, current = [], []
        elif c == "=" and not parts:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    end_argument()
    return args, kwargs


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        hint = " (twistd does not expand ~: write $HOME/...)" if path.startswith("~") else ""
        raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}{hint}") from None


def check_server_keys(private_key, certificate):
    """Raise ValueError, in one line naming the file, unless ``private_key`` holds an
    unencrypted PEM private key and ``certificate`` a PEM certificate of that key."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise ValueError(_NEED_TLS_EXTRA) from None
    key_pem, cert_pem = _read(private_key, "private key"), _read(certificate, "certificate")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(f"the private key {private_key} is encrypted: runai needs it unencrypted, "
                         f"in a file only the server can read") from None
    except ValueError:
        raise ValueError(f"{private_key} holds no PEM private key") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"{certificate} holds no PEM certificate") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"the private key {private_key} does not match the certificate {certificate}")


def check_server_endpoint(description):
    """Raise ValueError, in one line, unless Twisted can listen on ``description``: for an
    ``ssl:`` endpoint, its key and certificate read and checked as a pair (the key file
    holds both when ``certKey`` is not given, as Twisted has it); for any endpoint, a
    description that Twisted's parser accepts. Nothing listens here."""
    from twisted.internet import endpoints

    args, kwargs = endpoint_arguments(description)
    if args and args[0] == "ssl":
        named = dict(zip(SSL_ARGUMENTS, args[1:]), **kwargs)
        private_key = named.get("privateKey", "server.pem")
        check_server_keys(private_key, named.get("certKey") or private_key)
    try:
        endpoints.serverFromString(None, description)  # the reactor is only kept, never used
    except ImportError:
        raise ValueError(_NEED_TLS_EXTRA) from None
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot listen on {description!r}: {detail}") from None


def _cannot_read_ca(ca_file, detail):
    return TLSError(f"cannot read the CA file {ca_file}: {detail}")


def client_context(ca_file=None):
    """An :class:`ssl.SSLContext` for clients: TLS 1.2 or newer, the server's certificate
    and host name verified against ``ca_file`` (PEM; a self-signed server's own
    certificate) or else the system's trust store, with the strict checks of Python 3.13."""
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else os.path.expanduser(ca_file))
    except FileNotFoundError as e:
        raise _cannot_read_ca(ca_file, e.strerror) from None
    except ssl.SSLError:
        raise _cannot_read_ca(ca_file, "it holds no PEM certificate") from None
    except OSError as e:
        raise _cannot_read_ca(ca_file, e.strerror or e) from None
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def did_not_verify(host, port, detail, ca_file):
    """The error for a server certificate that did not verify against the trust asked for."""
    against = f"against {ca_file}" if ca_file is not None else (
        "against the system's trust store (a self-signed server's certificate is given with --ca-file)")
    return TLSError(f"the certificate of {host}:{port} did not verify {against}: {detail}")


def no_handshake(host, port, seconds):
    return TLSError(f"{host}:{port} did not answer the TLS handshake within {seconds:g} s; "
                    f"does the server listen with an ssl: endpoint?")


def handshake_failed(host, port, detail):
    return TLSError(f"the TLS handshake with {host}:{port} failed ({detail}); "
                    f"does the server listen with an ssl: endpoint?")


def lost_in_handshake(host, port, error, ca_file):
    """The error for a Twisted TLS connection lost, with ``error``, before its handshake
    was done: the certificate did not verify, was not for ``host``, or something else."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        return did_not_verify(host, port, f"it is not a certificate for {host}", ca_file)
    reasons = []
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        reasons = [reason[-1] for reason in error.args[0] if isinstance(reason, tuple) and reason]
    if "certificate verify failed" in reasons:
        return did_not_verify(host, port, "certificate verify failed", ca_file)
    return handshake_failed(host, port, "; ".join(reasons) or str(error) or type(error).__name__)


def connect_socket(host, port, timeout=None, ca_file=None, handshake_timeout=HANDSHAKE_TIMEOUT):
    """A socket connected to ``host:port`` over TLS, the handshake done and the server
    verified (see :func:`client_context`); raises :class:`TLSError` otherwise, and
    OSError (ConnectionRefusedError...) when TCP itself cannot connect."""
    context = client_context(ca_file)  # a bad CA file fails before any connection
    sock = socket.create_connection((host, port), timeout=timeout)
    seconds = handshake_timeout if timeout is None else min(timeout, handshake_timeout)
    try:
        sock.settimeout(seconds)
        secure = context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise did_not_verify(host, port, e.verify_message, ca_file) from None
    except ssl.SSLError as e:
        sock.close()
        raise handshake_failed(host, port, e.reason or e) from None
    except socket.timeout:
        sock.close()
        raise no_handshake(host, port, seconds) from None
    except OSError as e:
        sock.close()
        raise handshake_failed(host, port, e.strerror or e) from None
    secure.settimeout(timeout)
    return secure


def client_options(host, ca_file=None):
    """Twisted's client TLS options (``IOpenSSLClientConnectionCreator``): the server's
    certificate and ``host`` verified against ``ca_file`` (PEM) or the platform's trust."""
    try:
        from twisted.internet import ssl as twisted_ssl
    except ImportError:
        raise TLSError(_NEED_TLS_EXTRA) from None
    trust = None
    if ca_file is not None:
        try:
            with open(os.path.expanduser(ca_file), "rb") as f:
                blocks = _PEM_CERTIFICATE.findall(f.read())
        except OSError as e:
            raise _cannot_read_ca(ca_file, e.strerror or e) from None
        if not blocks:
            raise _cannot_read_ca(ca_file, "it holds no PEM certificate")
        trust = twisted_ssl.trustRootFromCertificates([twisted_ssl.Certificate.loadPEM(b) for b in blocks])
    return twisted_ssl.optionsForClientTLS(host, trustRoot=trust)
