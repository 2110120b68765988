"""Checks a running compose stack from outside, through its published ports.

1. mmgpt answers /ready, and Prometheus scrapes it: up{job="mmgpt"} == 1 for every target;
2. caption requests succeed (the same image twice, so the image cache is hit) and a
   request with a broken image fails with a 4xx (so the failure counter moves);
3. every query of the Grafana dashboard returns a finite value from Prometheus;
4. with --grafana: Grafana is healthy and has the provisioned dashboard.
Standard library only, so that it runs with any python3. Exit status 0 when all hold.

    python3 docker/check_stack.py --mmgpt URL --prometheus URL [--grafana URL]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dashboard import PanelQuery, load_dashboard, panel_queries

POLL_SECONDS = 2.0
REQUEST_TIMEOUT_SECONDS = 120.0
DASHBOARD_UID = "mmgpt-overview"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read())


def wait_until(what: str, condition: Callable[[], bool], deadline: float) -> None:
    """Polls `condition` until it holds; fails with `what` once the deadline passes."""
    while True:
        try:
            if condition():
                print(f"ok: {what}", flush=True)
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass  # not up yet
        if time.monotonic() > deadline:
            raise SystemExit(f"FAILED: {what} (deadline passed)")
        time.sleep(POLL_SECONDS)


def png_image(size: int = 64) -> bytes:
    """A white square with a red square in its upper left quarter, as PNG bytes."""
    red, white = b"\xff\x00\x00", b"\xff\xff\xff"
    rows = b"".join(
        b"\x00" + b"".join(red if x < size // 2 and y < size // 2 else white for x in range(size))
        for y in range(size)
    )

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def multipart(fields: dict[str, str], file_field: str, file_bytes: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
        f'filename="image.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + file_bytes
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def caption(mmgpt: str, image: bytes) -> Reply:
    body, content_type = multipart({"max_tokens": "16", "temperature": "0"}, "image", image)
    return http(f"{mmgpt}/v1/caption", body, {"Content-Type": content_type})


def texts_in(value: Any) -> list[str]:
    """Every non-empty string under a text/content key, wherever the response puts it."""
    if isinstance(value, dict):
        found = [v for k, v in value.items() if k in ("text", "content") and isinstance(v, str)]
        return [text for text in found if text.strip()] + [
            text for child in value.values() for text in texts_in(child)
        ]
    if isinstance(value, list):
        return [text for child in value for text in texts_in(child)]
    return []


def send_requests(mmgpt: str) -> None:
    image = png_image()
    for attempt in (1, 2):  # the second one hits the image cache
        reply = caption(mmgpt, image)
        if reply.status != 200:
            raise SystemExit(f"FAILED: caption {attempt} answered {reply.status}: {reply.body!r}")
        texts = texts_in(reply.json())
        if not texts:
            raise SystemExit(f"FAILED: caption {attempt} has no text: {reply.body!r}")
        print(f"ok: caption {attempt}: {texts[0]!r}", flush=True)
    broken = caption(mmgpt, b"these bytes are not an image")
    if not 400 <= broken.status < 500:
        raise SystemExit(f"FAILED: a broken image answered {broken.status}, not a 4xx")
    print(f"ok: a broken image is refused with {broken.status}", flush=True)


def instant_query(prometheus: str, promql: str) -> list[float]:
    """The values of an instant query's result; empty when it has no series."""
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    reply = http(url)
    payload = reply.json()
    if reply.status != 200 or payload.get("status") != "success":
        raise SystemExit(f"FAILED: Prometheus rejected {promql!r}: {reply.body!r}")
    return [float(series["value"][1]) for series in payload["data"]["result"]]


def target_is_up(prometheus: str) -> bool:
    values = instant_query(prometheus, 'up{job="mmgpt"}')
    return bool(values) and all(value == 1 for value in values)


def has_finite_value(prometheus: str, query: PanelQuery) -> bool:
    return any(math.isfinite(value) for value in instant_query(prometheus, query.promql()))


def check_dashboard_queries(prometheus: str, deadline: float) -> None:
    pending = panel_queries(load_dashboard())
    print(f"checking {len(pending)} dashboard queries", flush=True)
    while pending:
        pending = [query for query in pending if not has_finite_value(prometheus, query)]
        if pending and time.monotonic() > deadline:
            for query in pending:
                print(f"no data: {query.panel_title} [{query.ref_id}]: {query.promql()}")
            raise SystemExit(f"FAILED: {len(pending)} dashboard queries returned no data")
        if pending:
            time.sleep(POLL_SECONDS)
    print("ok: every dashboard query returns data", flush=True)


def check_grafana(grafana: str, deadline: float) -> None:
    wait_until("grafana is healthy", lambda: http(f"{grafana}/api/health").status == 200, deadline)
    reply = http(f"{grafana}/api/dashboards/uid/{DASHBOARD_UID}")
    if reply.status != 200:
        raise SystemExit(f"FAILED: grafana has no dashboard {DASHBOARD_UID}: {reply.status}")
    print("ok: grafana serves the provisioned dashboard", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mmgpt", required=True, help="published URL of the mmgpt service")
    parser.add_argument("--prometheus", required=True, help="published URL of Prometheus")
    parser.add_argument("--grafana", help="published URL of Grafana, when it runs")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for it all")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    deadline = time.monotonic() + args.deadline
    wait_until("mmgpt is ready", lambda: http(f"{args.mmgpt}/ready").status == 200, deadline)
    # One scrape before the requests, so that rates see the counters move.
    wait_until("prometheus scrapes mmgpt: up == 1", lambda: target_is_up(args.prometheus), deadline)
    send_requests(args.mmgpt)
    check_dashboard_queries(args.prometheus, deadline)
    if args.grafana:
        check_grafana(args.grafana, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
