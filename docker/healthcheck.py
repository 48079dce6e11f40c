#!/usr/bin/env python3
"""Container health probe (installed as ``lynx-healthcheck``): GET $LYNX_HEALTH_URL, exit 0 on
HTTP 200 and 1 otherwise. Standard library only, so it runs in every image without curl."""

import os
import sys
import urllib.error
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LYNX_HEALTH_URL", "")
if not url:
    print("lynx-healthcheck: set LYNX_HEALTH_URL or pass a URL", file=sys.stderr)
    sys.exit(2)
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"lynx-healthcheck: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
