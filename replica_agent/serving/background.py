"""The agent's HTTP server on its own event loop in a background thread (demo, benchmarks, tests)."""

from __future__ import annotations

import asyncio
import threading

from .http_api import API_KEY, drain, serve


class BackgroundServer:
    """Serves a started agent until `stop()`; the calling thread stays synchronous."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="collm-http", daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(serve(agent, host, port), self.loop).result(30)
        self.port = self.runner.addresses[0][1]
        self.url = f"http://{host}:{self.port}"
        self.api = self.runner.app[API_KEY]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(drain(self.runner), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
