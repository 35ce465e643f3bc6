"""GET /ui: one static page for people (``serving/ui.html``) that calls the service's own API.

The page is read once, at import. Its Content-Security-Policy allows the page's own inline script and
style by their SHA-256, computed here from the file, so an edit of the page needs no edit here, while
anything injected into it would not run; it may fetch only from this origin, and show images only
from here or the ones the user picked (``blob:``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.responses import HTMLResponse

PAGE = Path(__file__).with_name("ui.html").read_text(encoding="utf-8")


def _hashes(tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, flags=re.DOTALL)
    assert blocks, f"serving/ui.html has no <{tag}> block"
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


HEADERS = {
    "Content-Security-Policy": "; ".join(
        (
            "default-src 'none'",
            f"script-src {_hashes('script')}",
            f"style-src {_hashes('style')}",
            "img-src 'self' blob: data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    ),
    "X-Content-Type-Options": "nosniff",
    # The page changes only with a deploy; no-cache makes the browser ask again each time, never show an old one.
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def page() -> HTMLResponse:
    """The page, with its security headers."""
    return HTMLResponse(PAGE, headers=HEADERS)
