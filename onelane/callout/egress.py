"""Where a callout may go: the host allowlist and the refusal of private addresses.

The allowlist is checked on the URL before any connection is made. Private,
loopback, link-local (169.254.0.0/16, the cloud metadata address) and other
non-public addresses are refused on the *resolved* address, at connect time, and
the connection is made to the very address that was checked — so a DNS answer
that changes between check and connect, or a redirect, cannot get around it.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from onelane.core.errors import EgressRefused


@dataclass(frozen=True)
class EgressPolicy:
    allowed_hosts: tuple = ()
    allow_private: bool = False

    def check_url(self, url: str) -> None:
        """Raise EgressRefused if the URL's host (and port) is not on the allowlist."""
        if not self.allowed_hosts:
            return
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for pattern in self.allowed_hosts:
            p_host, _, p_port = pattern.rpartition(":") if pattern.count(":") == 1 else (pattern, "", "")
            if fnmatch.fnmatchcase(host, p_host) and (not p_port or int(p_port) == port):
                return
        raise EgressRefused(
            f"{host}:{port} is not in ONELANE_ALLOWED_HOSTS ({', '.join(self.allowed_hosts)}); "
            "the callout was not sent. Add the host to the list if it should be reachable"
        )

    def pick_address(self, host: str, port: int) -> str | None:
        """Resolve ``host`` and return the address to connect to; raise if it is not public.

        Returns None when private networks are allowed (urllib3 resolves as usual).
        """
        if self.allow_private:
            return None
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        for addr in addresses:
            if not is_public(addr):
                raise EgressRefused(
                    f"{host} resolves to {addr}, a loopback, private or link-local address; the callout "
                    "was not sent. Set ONELANE_ALLOW_PRIVATE_NETWORKS=1 only if the API really lives there"
                )
        return addresses[0]


def is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)
