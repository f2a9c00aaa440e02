"""Server candidates, each serving the same two endpoints.

POST /       read ~300-byte JSON body, orjson.loads it, return a ~600-byte JSON body
GET  /sse    50 `data: {...}\\n\\n` events, one write (flush) per event, no sleeps

    python servers.py aiohttp PORT                                       # aiohttp.web + uvloop
    uvicorn servers:asgi_app --loop uvloop --http httptools ...          # bare ASGI
    granian --interface asgi servers:asgi_app --loop uvloop ...          # granian ASGI
    granian --interface rsgi servers:rsgi_app --loop uvloop ...          # granian RSGI
"""

import os
import sys

import orjson
from payloads import RESPONSE_BYTES, SSE_EVENT, SSE_EVENTS

JSON_CT = "application/json"
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]


def handle(body: bytes) -> bytes:
    req = orjson.loads(body)
    assert req["model"]  # touch the parsed body
    return RESPONSE_BYTES


# --- bare ASGI (uvicorn, granian --interface asgi) ---------------------------------------------

async def asgi_app(scope, receive, send):
    if scope["type"] != "http":  # lifespan: accept and ignore
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        return
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.encode(), v.encode()) for k, v in SSE_HEADERS]})
        for _ in range(SSE_EVENTS):
            await send({"type": "http.response.body", "body": SSE_EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    out = handle(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", JSON_CT.encode()),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


# --- RSGI (granian --interface rsgi) ------------------------------------------------------------

async def rsgi_app(scope, proto):
    if scope.path == "/sse":
        transport = proto.response_stream(200, SSE_HEADERS)
        for _ in range(SSE_EVENTS):
            await transport.send_bytes(SSE_EVENT)
        return
    out = handle(await proto())
    proto.response_bytes(200, [("content-type", JSON_CT)], out)


# --- aiohttp.web ---------------------------------------------------------------------------------

def aiohttp_app():
    from aiohttp import web

    async def post(request: web.Request) -> web.Response:
        return web.Response(body=handle(await request.read()), content_type=JSON_CT)

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=dict(SSE_HEADERS))
        await resp.prepare(request)
        for _ in range(SSE_EVENTS):
            await resp.write(SSE_EVENT)  # write() drains: one flush per event
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/", post)
    app.router.add_get("/sse", sse)
    return app


if __name__ == "__main__":
    import uvloop
    from aiohttp import web

    web.run_app(aiohttp_app(), host="127.0.0.1", port=int(sys.argv[2]), access_log=None,
                print=None, shutdown_timeout=1,
                loop=None if os.environ.get("LOOP") == "asyncio" else uvloop.new_event_loop())
