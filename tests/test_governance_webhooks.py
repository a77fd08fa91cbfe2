"""Soft-budget webhooks are posted off the request path; a failing endpoint is logged and
counted, and the next alert still goes out."""

from __future__ import annotations

import asyncio

from aiohttp import web

from extproc.governance.alerts import WebhookSender


async def test_webhook_posts_and_failures_are_counted_not_raised(caplog):
    got: list[dict] = []
    fail = {"on": True}

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=500 if fail["on"] else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
    sender = WebhookSender(url)
    sender.start()
    alert = {"scope": "team=a", "threshold_pct": 50, "webhook": ""}
    sender(dict(alert))
    for _ in range(200):
        if sender.errors:
            break
        await asyncio.sleep(0.01)
    assert sender.errors == 1 and "budget webhook" in caplog.text and "HTTP 500" in caplog.text
    fail["on"] = False
    sender({**alert, "threshold_pct": 80})
    await sender.stop()
    assert sender.sent == 1 and [g["threshold_pct"] for g in got] == [50, 80]
    assert "webhook" not in got[0]  # the target is not part of the payload
    # no URL anywhere: nothing queued
    quiet = WebhookSender("")
    quiet(dict(alert))
    assert quiet._queue.empty()
    await runner.cleanup()
