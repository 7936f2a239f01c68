# -*- test-case-name: runai.test.test_broker_url -*-
"""The broker's address: ``redis://HOST:PORT/DB`` or ``rediss://`` (TLS), and its password.

The password comes from a file (``--broker-password-file``) or the environment
(``RUNAI_BROKER_PASSWORD``), never from the command line, where every user of the machine
can read it: a URL with a password in it is refused.
"""

import os
import urllib.parse
from dataclasses import dataclass
from typing import Optional

PASSWORD_VARIABLE = "RUNAI_BROKER_PASSWORD"
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = None
    ca_file: Optional[str] = None

    def __repr__(self):
        # Never the password: this lands in logs.
        scheme = "rediss" if self.tls else "redis"
        return f"<BrokerAddress {scheme}://{self.host}:{self.port}/{self.db}>"

    @property
    def display(self):
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def read_password(password_file=None, environ=None):
    """The password from ``password_file`` (stripped of its line end) or the environment;
    None if neither has one. Raises ValueError for an unreadable or empty file."""
    environ = os.environ if environ is None else environ
    if password_file is not None:
        try:
            with open(os.path.expanduser(password_file), encoding="utf-8") as f:
                password = f.read().strip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the password file {password_file}: {e}") from None
        if not password:
            raise ValueError(f"the password file {password_file} is empty")
        return password
    return environ.get(PASSWORD_VARIABLE) or None


def parse_url(url, password_file=None, ca_file=None, environ=None):
    """A :class:`BrokerAddress` from ``url``; raises ValueError with a message for people."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB, not {url!r}")
    if parts.password is not None:
        raise ValueError("the URL holds a password, which every user of this machine can read on the command "
                         f"line: put it in a file given with --broker-password-file (or {PASSWORD_VARIABLE})")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number (redis://HOST:PORT/0), not {path!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"no options are read from the URL; use the --broker-* options ({url!r})")
    if ca_file is not None:
        if parts.scheme != "rediss":
            raise ValueError("--broker-ca-file needs a rediss:// URL")
        if not os.path.isfile(os.path.expanduser(ca_file)):
            raise ValueError(f"the CA file {ca_file} does not exist")
        ca_file = os.path.expanduser(ca_file)
    return BrokerAddress(
        host=parts.hostname, port=port, db=int(path or 0), tls=parts.scheme == "rediss",
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=read_password(password_file, environ), ca_file=ca_file,
    )
