"""`http_get`: fetch a URL over http(s), with a timeout and a cap on the body it returns.

Safe by default: only ``http`` and ``https``; the body is read up to
`LONGHAUL_HTTP_GET_MAX_BYTES` (the rest is cut off, and the result says
so); the request gives up after `LONGHAUL_HTTP_GET_TIMEOUT_S`; and unless
`LONGHAUL_HTTP_GET_ALLOW_PRIVATE` is set, every host (and every redirect's
host) must resolve to public addresses only, so a model cannot reach the
worker's loopback, private network or cloud metadata endpoint, not even
through an IPv6 address that embeds a private IPv4 one (NAT64, 6to4,
Teredo, IPv4-mapped or -compatible).
(The check resolves the name before httpx does: a DNS server that answers
differently the second time could still slip past it; run workers behind an
egress proxy where that matters.)
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Optional
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ToolError
from .base import ToolContext, define_tool

#: Redirects followed at most (each one checked like the first URL).
MAX_REDIRECTS = 5
ALLOWED_SCHEMES = ("http", "https")


class HttpGetArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=8000, description="The http:// or https:// URL to fetch.")
    max_bytes: Optional[int] = Field(default=None, ge=1,
                                     description="Return at most this many bytes of the body "
                                                 "(default and upper bound: the worker's limit).")


#: NAT64 prefixes (RFC 6052 well-known, RFC 8215 local-use): the last 32 bits are an IPv4 address a
#: NAT64 gateway connects to. The local-use prefix may embed it elsewhere, and is never public: refused whole.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
#: IPv4-compatible addresses (``::a.b.c.d``, deprecated by RFC 4291) carry an IPv4 address in their last 32 bits.
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translator or tunnel.

    IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16`` and Teredo ``2001::/32`` (its server
    and its client). Python's ``is_global`` judges such an address by its
    IPv6 prefix alone, so ``64:ff9b::a00:1`` (10.0.0.1 behind a NAT64
    gateway) would pass as public.
    """
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in IPV4_COMPATIBLE or address in NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether http_get may connect to `address`: global unicast, and so is every IPv4 address it embeds."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64_LOCAL_USE:
            return False
        return all(inner.is_global and not inner.is_multicast for inner in embedded_ipv4(address))
    return True


def check_url(url: str, *, allow_private: bool) -> None:
    """`ToolError` unless `url` is http(s) with a host that resolves to public addresses only."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise ToolError(f"url {url!r}: scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
    host = parts.hostname
    if not host:
        raise ToolError(f"url {url!r}: has no host")
    if allow_private:
        return
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise ToolError(f"url {url!r}: cannot resolve {host!r} ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not is_public_address(address):
            raise ToolError(f"url {url!r}: {host} resolves to {address}, which is not a public address; "
                            "http_get reaches public addresses only (LONGHAUL_HTTP_GET_ALLOW_PRIVATE allows more)")


def _read_capped(response: httpx.Response, cap: int, deadline: float, timeout_s: float) -> tuple[bytes, bool]:
    """Up to `cap` bytes of the body, and whether there was more."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > cap:
            return bytes(body[:cap]), True
        if time.monotonic() > deadline:
            raise ToolError(f"timed out after {timeout_s:g} s reading the body")
    return bytes(body), False


def _describe(response: httpx.Response, body: bytes, truncated: bool, cap: int) -> str:
    content_type = response.headers.get("content-type", "(none)")
    head = f"HTTP {response.status_code} {response.reason_phrase}\ncontent-type: {content_type}\n\n"
    if b"\x00" in body[:1024]:
        text = f"[binary body, {len(body)}{'+' if truncated else ''} bytes, not shown]"
    else:
        text = body.decode(response.encoding or "utf-8", errors="replace")
    if truncated:
        length = response.headers.get("content-length")
        of = f" of {length}" if length else ""
        text += f"\n[truncated: showing the first {cap}{of} bytes]"
    return head + text


@define_tool("http_get", parallel=True)
def http_get(args: HttpGetArguments, ctx: ToolContext) -> str:
    """Fetch a web page or API response with HTTP GET. Returns the status, content type and body (size-capped)."""
    settings = ctx.get_settings()
    cap = min(args.max_bytes or settings.http_get_max_bytes, settings.http_get_max_bytes)
    timeout_s = settings.http_get_timeout_s
    deadline = time.monotonic() + timeout_s
    url = args.url
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                          headers={"User-Agent": "longhaul-http_get"}) as client:
            for _ in range(MAX_REDIRECTS + 1):
                check_url(url, allow_private=settings.http_get_allow_private)
                with client.stream("GET", url) as response:
                    location = response.headers.get("location")
                    if response.is_redirect and location:
                        url = urljoin(url, location)
                        continue
                    body, truncated = _read_capped(response, cap, deadline, timeout_s)
                    return _describe(response, body, truncated, cap)
    except httpx.TimeoutException:
        raise ToolError(f"GET {url}: timed out after {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise ToolError(f"GET {url}: {type(exc).__name__}: {exc}") from None
    raise ToolError(f"GET {args.url}: more than {MAX_REDIRECTS} redirects")


HTTP_GET = http_get
