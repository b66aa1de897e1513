"""Image references of API requests -> the encoded image's bytes (decoded by the runtime's ``load_image``,
which applies the input limits: formats, pixels, aspect ratio, decompression bombs).

Accepted: data URLs (``data:image/png;base64,...``) and bare base64. ``http(s)`` URLs only for hosts
the server allows (``--allow-image-host``): a server that fetches any URL a client names is an SSRF
hole (cloud metadata endpoints, internal services). Never ``file:`` or local paths.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from bgevl.core.errors import InputError

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class FetchPolicy:
    """Which image URLs the server fetches, and what one fetch may cost.

    ``hosts`` are the operator's ``--allow-image-host`` entries: a bare name allows that host on its
    scheme's default port (80, 443) only, ``host:port`` that port. A name must resolve to public addresses
    only: an allowed name that resolves to a loopback, private, link-local (169.254.169.254: cloud metadata)
    or otherwise reserved address is refused, since it would reach the server's own network; an operator
    who means such an address names it (``10.0.0.5:8080``). The check runs on each redirect too. (urllib
    resolves the name again when it connects: a DNS answer that changes between the two is not caught.)"""

    #: lower-case host names (or host:port; "*": any host, default ports, public addresses); empty: fetching is off
    hosts: frozenset[str] = frozenset()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3

    def allows(self, url: str) -> bool:
        return self.refusal(url) is None

    def refusal(self, url: str) -> str | None:
        """Why ``url`` is not fetched (None: it is)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return f"{parts.scheme or 'no'} scheme: only http(s) image URLs are fetched"
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return f"{parts.netloc!r} is not a valid host and port"
        named = f"{host}:{port}" in self.hosts or f"[{host}]:{port}" in self.hosts
        default_port = port == (443 if parts.scheme == "https" else 80)
        if not named and not ((host in self.hosts or "*" in self.hosts) and default_port):
            return (f"host {parts.netloc!r} is not in the server's --allow-image-host list (a bare name allows its "
                    f"default port only)")
        address = _ip(host)
        if address is not None and (named or host in self.hosts):
            return None  # the operator named the address itself
        if address is not None and not address.is_global:  # an address reached through "*"
            return (f"{address} is a loopback, private or reserved address; the server does not fetch from its own "
                    f"network unless the address is named in --allow-image-host")
        return _private_address(host, port) if address is None else None


def _ip(host: str) -> "ipaddress.IPv4Address | ipaddress.IPv6Address | None":
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _private_address(host: str, port: int) -> str | None:
    """Why ``host`` may not be fetched from by name: it resolves to a non-public address (None: all public)."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        return f"host {host!r} does not resolve ({getattr(exc, 'strerror', None) or exc})"
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            return (f"host {host!r} resolves to {address}, a loopback, private or reserved address; the server does "
                    f"not fetch from its own network by name: name the address itself in --allow-image-host")
    return None


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:"


def is_image_data_url(value: str) -> bool:
    return value[:11].lower() == "data:image/"


def is_url(value: str) -> bool:
    return value[:7].lower() == "http://" or value[:8].lower() == "https://"


def decode_reference(value: str, label: str) -> bytes:
    """A data URL or bare base64 -> bytes; URLs and paths are refused here (fetching is :func:`fetch`'s)."""
    if is_data_url(value):
        match = _DATA_URL.match(value)
        if not match or not match.group("b64"):
            raise InputError(f"{label}: a data URL must be base64-encoded (data:image/png;base64,...)")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise InputError(f"{label}: data URL of type {mime!r}; send an image (image/png, image/jpeg, ...)")
        payload = value[match.end():]
    elif value[:5].lower() == "file:" or value.startswith(("/", "./", "../", "~")):
        raise InputError(f"{label}: local files are not read by the server; send the image's bytes as a data URL "
                         f"(data:image/png;base64,...) or bare base64")
    else:
        payload = value
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{label}: not valid base64; send a data URL (data:image/png;base64,...) or the base64 of "
                         f"the image file") from None
    if not data:
        raise InputError(f"{label}: empty image; send the encoded image file (PNG, JPEG, ...)")
    return data


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: FetchPolicy, label: str):
        self.policy, self.label = policy, label
        # typeshed declares max_redirections a ClassVar; urllib reads it from the handler instance
        self.max_redirections = policy.max_redirects  # type: ignore[misc]

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        why = self.policy.refusal(newurl)
        if why is not None:
            raise InputError(f"{self.label}: the image URL redirects to {urllib.parse.urlsplit(newurl).netloc or newurl!r}, "
                             f"a host the server does not fetch from ({why})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, label: str, policy: FetchPolicy) -> bytes:
    """GET an image from an allowed host with the policy's size, time and redirect limits (blocking).

    urllib rather than an HTTP client library: the serving environment has none (httpx is not
    installed), and this is one bounded GET with a redirect check."""
    if not policy.hosts:
        raise InputError(f"{label}: this server does not fetch image URLs (a server that fetches URLs is an SSRF hole); "
                         f"send the image as a data URL (data:image/png;base64,...) or bare base64, or start the server "
                         f"with --allow-image-host HOST")
    why = policy.refusal(url)
    if why is not None:
        raise InputError(f"{label}: {why}; send the image as a data URL instead")
    opener = urllib.request.build_opener(_LimitedRedirects(policy, label))
    request = urllib.request.Request(url, headers={"User-Agent": "bgevl-api", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise InputError(f"{label}: the image at the URL is {int(declared)} bytes, over the server's limit of "
                                 f"{policy.max_bytes}")
            data = response.read(policy.max_bytes + 1)
    except InputError:
        raise
    except urllib.error.HTTPError as exc:
        raise InputError(f"{label}: fetching the image URL failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"{label}: fetching the image URL failed ({reason}); check the URL or send a data URL") from None
    if len(data) > policy.max_bytes:
        raise InputError(f"{label}: the image at the URL is over the server's limit of {policy.max_bytes} bytes")
    return data
