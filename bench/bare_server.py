"""The baseline: a bare aiohttp handler answering fixed bytes (what a hit costs at the least)."""

from __future__ import annotations

import sys

from aiohttp import web


def main() -> None:
    port = int(sys.argv[1])
    body = open(sys.argv[2], "rb").read()  # noqa: SIM115 - read once at start

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/openai/v1/containers/{container_id}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
