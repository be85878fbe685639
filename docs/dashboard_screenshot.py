"""Screenshot of the Ray dashboard's Serve view, as the README shows it (headless Chromium, Debian's ``chromium``).

    llmp serve --config serve_apps/configs/local.yaml &          # prints "Ray dashboard: http://HOST:PORT/#/serve"
    python docs/dashboard_screenshot.py http://127.0.0.1:8265 docs/ray_dashboard_serve.png

Ray's dashboard asks for the cluster's auth token (``RAY_AUTH_MODE=token``, ``~/.ray/auth_token``) in
a login box. Headless Chromium cannot type it, so Chromium goes through a local proxy that adds
``Authorization: Bearer TOKEN`` to each request, as a browser sends the dashboard's cookie.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web


def token() -> str:
    return os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()


async def shoot(dashboard: str, out: Path) -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        async with session.request(request.method, dashboard.rstrip("/") + request.rel_url.path_qs,
                                   headers=headers, data=await request.read()) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items()
                    if k.lower() in ("content-type", "cache-control")}
            return web.Response(status=upstream.status, body=body, headers=kept)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    command = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--window-size=1500,950", "--virtual-time-budget=20000", f"--screenshot={out}",
               f"http://127.0.0.1:{port}/#/serve"]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await process.wait()
    await runner.cleanup()
    await session.close()
    print(f"{out}: {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    asyncio.run(shoot(sys.argv[1], Path(sys.argv[2])))
