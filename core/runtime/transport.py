"""The one transport between the frontend and the scheduler process: a pair of ZMQ
``ipc://`` sockets carrying pickled messages, used by both ends.

The frontend binds both sockets in a private temporary folder (:meth:`Channel.bind`); the
scheduler connects (:meth:`Channel.connect`). Sends never block: a peer that stopped reading
makes :meth:`Channel.send` raise :class:`TransportClosed` instead of freezing the caller's
event loop.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from dataclasses import dataclass

import zmq


class TransportClosed(RuntimeError):
    """The peer is gone or not reading; nothing was sent."""


@dataclass(frozen=True)
class Addresses:
    """``to_scheduler``: frontend PUSH -> scheduler PULL; ``from_scheduler``: the reverse."""

    to_scheduler: str
    from_scheduler: str


def encode(message: object) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> object:
    return pickle.loads(data)


class Channel:
    """One end of the pair: ``send`` pushes to the peer, ``recv`` pulls from it."""

    def __init__(self, context: zmq.Context, push_addr: str, pull_addr: str, bind: bool,
                 linger_ms: int = 0) -> None:
        self.context = context
        self.push = context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, linger_ms)
        self.push.setsockopt(zmq.SNDHWM, 0)  # queue rather than block
        self.pull = context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        if bind:
            self.push.bind(push_addr)
            self.pull.bind(pull_addr)
        else:
            self.push.connect(push_addr)
            self.pull.connect(pull_addr)
        self._poller = zmq.Poller()
        self._poller.register(self.pull, zmq.POLLIN)
        self._folder: str | None = None

    @classmethod
    def bind(cls) -> tuple[Channel, Addresses]:
        """The frontend's end, bound in a fresh private folder; returns it and the
        addresses the scheduler must connect to."""
        folder = tempfile.mkdtemp(prefix="heteroserve-")
        addrs = Addresses(f"ipc://{folder}/to_scheduler", f"ipc://{folder}/from_scheduler")
        channel = cls(zmq.Context(), addrs.to_scheduler, addrs.from_scheduler, bind=True)
        channel._folder = folder
        return channel, addrs

    @classmethod
    def connect(cls, addrs: Addresses, io_cores: tuple[int, ...] = ()) -> Channel:
        """The scheduler's end (flushes pending sends for up to 2 s on close). ``io_cores``:
        where ZMQ's own I/O thread runs (empty: wherever the OS puts it)."""
        context = zmq.Context()
        for core in io_cores:  # must precede the first socket, which starts the I/O thread
            context.set(zmq.THREAD_AFFINITY_CPU_ADD, core)
        return cls(context, addrs.from_scheduler, addrs.to_scheduler, bind=False,
                   linger_ms=2000)

    def send(self, message: object) -> None:
        """Pickle and push ``message`` without blocking; :class:`TransportClosed` if the peer
        cannot take it."""
        try:
            self.push.send(encode(message), zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:
            raise TransportClosed(f"cannot send {type(message).__name__}: {exc}") from None

    def send_when_connected(self, message: object, timeout_ms: int) -> None:
        """Send ``message``, waiting up to ``timeout_ms`` for the peer to connect (a bound
        socket has no peer until the other end's connection completes); after this first
        message, :meth:`send` never finds the peer missing unless it went away."""
        self.push.setsockopt(zmq.SNDTIMEO, timeout_ms)
        try:
            self.push.send(encode(message))
        except zmq.Again:
            raise TransportClosed(f"the peer did not connect within {timeout_ms} ms") from None
        finally:
            self.push.setsockopt(zmq.SNDTIMEO, -1)

    def recv(self, timeout_ms: int) -> object | None:
        """The next message, or None after ``timeout_ms`` with nothing to read. Raises
        ``pickle.UnpicklingError`` / ``zmq.ZMQError`` for an unreadable message or a closed
        socket."""
        if not self._poller.poll(timeout_ms):
            return None
        return decode(self.pull.recv())

    def close(self) -> None:
        """Close both sockets and the context and remove the folder (idempotent)."""
        self.push.close()
        self.pull.close()
        self.context.term()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
