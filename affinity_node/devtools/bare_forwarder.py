"""The floor for any aiohttp proxy: read the body, POST it upstream, stream the answer back.

    python -m affinity_node.devtools.bare_forwarder PORT UPSTREAM_URL [--no-uvloop] [--http1]

No auth, no routing, no metrics: whatever the affinity node costs beyond this is its own.
By default it forwards with aiohttp's ClientSession (the baseline the hot-path targets name);
`--http1` forwards with the node's own client (upstream/http1.py), the floor for the node's
relay, so that the cost of everything else the node does shows on its own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from affinity_node.upstream.keepalive import ConnectionPool, header_lines

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
POOL: web.AppKey[ConnectionPool] = web.AppKey("pool", ConnectionPool)
MAX_BODY = 64 * 1024 * 1024
"""aiohttp's default (1 MiB) refuses the benchmark's 1 MB body with a 413; the node allows 8 MiB."""


def build_app(upstream: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:
            app[SESSION] = s
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        url = upstream + request.path_qs
        async with request.app[SESSION].request(
            request.method, url, data=body, headers=headers
        ) as up:
            ctype = up.headers.get("Content-Type", "application/octet-stream")
            if not ctype.startswith("text/event-stream"):
                data = await up.read()
                return web.Response(status=up.status, body=data, headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=MAX_BODY)
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def build_http1_app(upstream: str) -> web.Application:
    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = p = ConnectionPool(connect_timeout_s=5.0)
        yield
        await p.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        lines = header_lines(
            {"Content-Type": request.headers.get("Content-Type", "application/json")}
        )
        async with await request.app[POOL].post(upstream, request.path_qs, lines, body, 600) as up:
            ctype = up.headers.get("Content-Type", "application/octet-stream")
            if not ctype.startswith("text/event-stream"):
                data = await up.read()
                return web.Response(status=up.status, body=data, headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            while chunk := await up.readany():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=MAX_BODY)
    app.cleanup_ctx.append(pool)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: list[str]) -> None:
    port, upstream = int(argv[0]), argv[1].rstrip("/")
    loop_name = "asyncio"
    if "--no-uvloop" not in argv:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            loop_name = "uvloop"
    http1 = "--http1" in argv
    client = "http1" if http1 else "aiohttp"
    print(
        f"bare forwarder on 127.0.0.1:{port} -> {upstream} ({loop_name}, {client} client)",
        file=sys.stderr,
    )
    app = build_http1_app(upstream) if http1 else build_app(upstream)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
