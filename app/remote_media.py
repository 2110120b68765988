"""Fetching http(s) image URLs: allow-listed hosts only, public addresses only.

Each hop (the first request and every redirect) is checked the same way: the
host must be on the allow-list, every address its name resolves to must be a
public one, and the connection goes to the address that was checked (so a
second DNS answer cannot point it elsewhere). Bodies are read with a byte cap
and the whole fetch runs under one deadline.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable

import anyio
import httpx

from app.errors import bad_request, too_large
from app.media import ImageLimits, check_size

MAX_REDIRECTS = 3
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    answers = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for *_, sockaddr in answers]


# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway may forward to:
# NAT64 (RFC 6052) and the deprecated IPv4-compatible form.
_IPV4_CARRYING = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))


def is_public_address(address: str) -> bool:
    """A global unicast address, and so is any IPv4 address it carries (mapped, 6to4, NAT64)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_global(ip.ipv4_mapped)
        carried = _carried_ipv4(ip)
        if carried is not None and not _is_global(carried):
            return False
    return _is_global(ip)


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in _IPV4_CARRYING):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


class RemoteImageFetcher:
    """Downloads one image from an allow-listed host within limits."""

    def __init__(
        self,
        allowed_hosts: list[str],
        limits: ImageLimits,
        timeout_s: float,
        *,
        resolver: Resolver = resolve_host,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allowed_hosts = frozenset(allowed_hosts)
        self.limits = limits
        self.timeout_s = timeout_s
        self._resolver = resolver
        self._transport = transport

    async def fetch(self, url: str, param: str) -> bytes:
        if not self.allowed_hosts:
            raise bad_request(
                "Image URLs are not enabled on this server; send a base64 data: URL.", param
            )
        try:
            with anyio.fail_after(self.timeout_s):
                return await self._fetch_following_redirects(httpx.URL(url), param)
        except TimeoutError:
            raise bad_request(f"Fetching the image took over {self.timeout_s} s.", param) from None
        except httpx.HTTPError as error:
            raise bad_request(f"Fetching the image failed: {error}", param) from None

    async def _fetch_following_redirects(self, url: httpx.URL, param: str) -> bytes:
        async with httpx.AsyncClient(
            transport=self._transport, follow_redirects=False, trust_env=False
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                response = await self._send(client, url, param)
                if not response.is_redirect:
                    return await self._read_body(response, param)
                await response.aclose()
                url = url.join(response.headers.get("location", ""))
        raise bad_request(f"The image URL redirected more than {MAX_REDIRECTS} times.", param)

    async def _send(self, client: httpx.AsyncClient, url: httpx.URL, param: str) -> httpx.Response:
        address = await self._checked_address(url, param)
        pinned = url.copy_with(host=address)
        host_header = url.host if url.port is None else f"{url.host}:{url.port}"
        request = client.build_request(
            "GET", pinned, headers={"Host": host_header}, extensions={"sni_hostname": url.host}
        )
        return await client.send(request, stream=True)

    async def _checked_address(self, url: httpx.URL, param: str) -> str:
        if url.scheme not in ("http", "https"):
            raise bad_request("Image URLs must be http(s) or data: URLs.", param)
        host = url.host.lower().rstrip(".")
        if host not in self.allowed_hosts:
            raise bad_request(f"Image URLs from {host!r} are not allowed.", param)
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await self._resolver(host, port)
        if not addresses or not all(is_public_address(address) for address in addresses):
            raise bad_request(f"{host!r} does not resolve to a public address.", param)
        return addresses[0]

    async def _read_body(self, response: httpx.Response, param: str) -> bytes:
        try:
            if response.status_code != 200:
                raise bad_request(
                    f"Fetching the image returned HTTP {response.status_code}.", param
                )
            check_size(_declared_length(response), self.limits, param)
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.limits.max_bytes:
                    raise too_large(f"The image is over {self.limits.max_bytes} bytes.", param)
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            await response.aclose()


def _declared_length(response: httpx.Response) -> int:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else 0
