"""Container health probe: exit 0 when the service answers GET /ready with 200, else 1.

/ready (not /health) is probed so that the container turns healthy only once the model
is loaded and the engine loop runs; compose starts Prometheus after that.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def ready_url() -> str:
    port = os.environ.get("MMGPT_PORT", "8000")
    return f"http://127.0.0.1:{port}/ready"


def main() -> int:
    try:
        with urllib.request.urlopen(ready_url(), timeout=TIMEOUT_SECONDS) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
