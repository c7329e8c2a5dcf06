"""A TCP proxy that can cut its traffic on command: the store becoming unreachable."""
from __future__ import annotations

import asyncio


class FaultProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.down = False
        self.hang = False  # while down: swallow traffic silently (a lost link) instead of refusing it
        self._conns: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> FaultProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        if self.down:
            if self.hang:
                await _swallow(reader)
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src, dst):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if self.down:
                        if self.hang:
                            continue  # lost on the way; the connection stays open, silent
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.difference_update((writer, up_writer))

    def cut(self, hang: bool = False) -> None:
        """Every connection dropped and new ones refused at once; with ``hang``, every byte
        lost instead, on open and new connections alike (a partition: only timeouts tell)."""
        self.down, self.hang = True, hang
        if not hang:
            for w in list(self._conns):
                w.close()
            self._conns.clear()

    def restore(self) -> None:
        self.down = False

    async def stop(self) -> None:
        self.hang = False
        self.cut()
        self.server.close()


async def _swallow(reader) -> None:
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, asyncio.CancelledError):
        pass
