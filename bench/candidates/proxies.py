"""Minimal reverse proxies: one server front-end x one upstream client.

POST /     forward the body to $UPSTREAM (POST), return the upstream body
GET  /sse  stream $UPSTREAM_SSE back chunk by chunk as it arrives

Client is picked by $PROXY_CLIENT: aiohttp | httpcore | httpx | pyreqwest.
Each client is one long-lived, keep-alive pooled instance with no connection cap,
created lazily on the first request (its constructor is sync, so no race).

    PROXY_CLIENT=aiohttp python proxies.py aiohttp PORT                 # aiohttp.web front
    PROXY_CLIENT=aiohttp granian --interface rsgi proxies:rsgi_app ...  # granian RSGI front
    PROXY_CLIENT=aiohttp uvicorn proxies:asgi_app ...                   # ASGI front
"""

import os
import sys

JSON_CT = "application/json"
SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9100/")
UPSTREAM_SSE = os.environ.get("UPSTREAM_SSE", "http://127.0.0.1:9101/sse")
CLIENT = os.environ.get("PROXY_CLIENT", "aiohttp")


class AiohttpClient:
    def __init__(self):
        import aiohttp

        self.s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def post(self, body: bytes) -> bytes:
        async with self.s.post(UPSTREAM, data=body, headers={"content-type": JSON_CT}) as r:
            return await r.read()

    async def stream(self):
        async with self.s.get(UPSTREAM_SSE) as r:
            async for chunk in r.content.iter_any():
                yield chunk


class HttpcoreClient:
    def __init__(self):
        import httpcore

        self.p = httpcore.AsyncConnectionPool(max_connections=10_000,
                                              max_keepalive_connections=10_000)
        self.h = [(b"content-type", JSON_CT.encode())]

    async def post(self, body: bytes) -> bytes:
        r = await self.p.request("POST", UPSTREAM, headers=self.h, content=body)
        return r.content

    async def stream(self):
        async with self.p.stream("GET", UPSTREAM_SSE) as r:
            async for chunk in r.aiter_stream():
                yield chunk


class HttpxClient:
    def __init__(self):
        import httpx

        self.c = httpx.AsyncClient(limits=httpx.Limits(max_connections=None,
                                                       max_keepalive_connections=None))

    async def post(self, body: bytes) -> bytes:
        r = await self.c.post(UPSTREAM, content=body, headers={"content-type": JSON_CT})
        return r.content

    async def stream(self):
        async with self.c.stream("GET", UPSTREAM_SSE) as r:
            async for chunk in r.aiter_raw():
                yield chunk


class PyreqwestClient:
    def __init__(self):
        from pyreqwest.client import ClientBuilder

        self.c = ClientBuilder().build()

    async def post(self, body: bytes) -> bytes:
        req = self.c.post(UPSTREAM).header("content-type", JSON_CT).body_bytes(body).build()
        r = await req.send()
        return (await r.bytes()).to_bytes()

    async def stream(self):
        # limit 0: hand over each chunk as it arrives (the default prefetches up to 64 KiB
        # before returning headers, which holds back the start of an SSE stream)
        async with self.c.get(UPSTREAM_SSE).streamed_read_buffer_limit(0).build_streamed() as r:
            reader = r.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                yield chunk.to_bytes()


CLIENTS = {"aiohttp": AiohttpClient, "httpcore": HttpcoreClient,
           "httpx": HttpxClient, "pyreqwest": PyreqwestClient}
_client = None


def client():
    global _client
    if _client is None:
        _client = CLIENTS[CLIENT]()
    return _client


# --- granian RSGI front ---------------------------------------------------------------------------

async def rsgi_app(scope, proto):
    if scope.path == "/sse":
        transport = proto.response_stream(200, SSE_HEADERS)
        async for chunk in client().stream():
            await transport.send_bytes(chunk)
        return
    out = await client().post(await proto())
    proto.response_bytes(200, [("content-type", JSON_CT)], out)


# --- bare ASGI front ------------------------------------------------------------------------------

async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.encode(), v.encode()) for k, v in SSE_HEADERS]})
        async for chunk in client().stream():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    out = await client().post(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", JSON_CT.encode()),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


# --- aiohttp.web front ----------------------------------------------------------------------------

def aiohttp_app():
    from aiohttp import web

    async def post(request: web.Request) -> web.Response:
        out = await client().post(await request.read())
        return web.Response(body=out, content_type=JSON_CT)

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=dict(SSE_HEADERS))
        await resp.prepare(request)
        async for chunk in client().stream():
            await resp.write(chunk)
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
