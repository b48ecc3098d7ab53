"""A test CA (trustme) and the server certificates the TLS tests need, written as PEM files."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import NamedTuple

import trustme

SERVER_IDENTITIES = ("localhost", "127.0.0.1", "::1")


class CertPair(NamedTuple):
    """PEM paths: ``cert`` holds the leaf then its chain, ``key`` the private key."""

    cert: Path
    key: Path


def _write_leaf(leaf: trustme.LeafCert, directory: Path, name: str) -> CertPair:
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


class Certs:
    """A trustme CA (``ca_pem``) and a server cert for localhost, 127.0.0.1 and ::1 (``cert_pem``,
    ``key_pem``), all written under ``directory``; more certs on demand for TLS fault tests."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_pem = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.server = self.issue("server", *SERVER_IDENTITIES)
        self.cert_pem, self.key_pem = self.server

    def issue(
        self,
        name: str,
        *identities: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertPair:
        """Issue a leaf for ``identities`` (host names or IPs) signed by this CA; write ``name``.pem/.key."""
        leaf = self.ca.issue_cert(*identities, not_before=not_before, not_after=not_after)
        return _write_leaf(leaf, self.directory, name)

    def wrong_host(self) -> CertPair:
        """A cert from this CA valid only for wrong.invalid: hostname verification must fail."""
        return self.issue("wrong-host", "wrong.invalid")

    def expired(self) -> CertPair:
        """A cert from this CA for the loopback identities that expired a day ago."""
        now = datetime.datetime.now(datetime.UTC)
        return self.issue(
            "expired",
            *SERVER_IDENTITIES,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    def untrusted(self) -> CertPair:
        """A cert for the loopback identities signed by another CA, unknown to clients of this one."""
        return _write_leaf(trustme.CA().issue_cert(*SERVER_IDENTITIES), self.directory, "untrusted")

    def client_context(self) -> ssl.SSLContext:
        """A client SSLContext that trusts this CA only (hostname checking on)."""
        return ssl.create_default_context(cafile=str(self.ca_pem))
