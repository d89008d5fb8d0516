#!/usr/bin/env python3
"""The counter example in Python, with nothing but the standard library: the reference
implementation of hotswap's handoff format (docs/handoff.md) in a second language.

Every line a client sends is answered with the session's running count and the generation
that counted it ("3 gen 2"). Under `hotswap run --handoff` a draining generation hands each
session (the connection, the bytes of an unfinished line, the count) to the next generation,
which carries on counting:

    hotswap run counter --handoff --listen tcp://127.0.0.1:7070 -- python3 examples/handoff/counter.py
"""

import os
import select
import signal
import socket
import struct
import sys
import threading

# The packet header: magic, version, kind, two reserved bytes, id, buffered length, state
# length; little-endian, 24 bytes. The buffered bytes and the state follow it.
HEADER = struct.Struct("<4sBB2xQII")
MAGIC, VERSION = b"HSHO", 1
CONNECTION, ADOPTED, DECLINED, DONE, ACCEPTING = 1, 2, 3, 4, 5
MAX_PACKET = 64 * 1024
MAX_LINE = 4096

draining = threading.Event()


class Channel:
    """This generation's end of the handoff channel: hands connections over and takes them."""

    def __init__(self, fd):
        os.set_inheritable(fd, False)  # ours alone: a child must not keep it open after us
        self.sock = socket.socket(fileno=fd)
        self.send_lock = threading.Lock()
        self.answers = {}  # id -> [threading.Event, outcome]
        self.answers_lock = threading.Lock()
        self.next_id = 1

    def send(self, kind, ident=0, buffered=b"", state=b"", fd=None):
        packet = HEADER.pack(MAGIC, VERSION, kind, ident, len(buffered), len(state))
        packet += buffered + state
        with self.send_lock:
            if fd is None:
                self.sock.sendmsg([packet])
            else:
                rights = struct.pack("i", fd)
                self.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

    def hand_over(self, conn, buffered, state):
        """False if `conn` is still ours (declined); True if we must close our copy: the next
        generation adopted it, or the channel closed before the answer and no one can say
        (closing our copy, never shutdown(), leaves it to whoever holds the other)."""
        with self.answers_lock:
            if self.answers is None:
                return False  # the channel is closed: nothing was sent
            ident, self.next_id = self.next_id, self.next_id + 1
            waiter = self.answers[ident] = [threading.Event(), "unknown"]
        try:
            self.send(CONNECTION, ident, buffered, state, conn.fileno())
        except OSError:
            with self.answers_lock:
                if self.answers is not None:
                    self.answers.pop(ident, None)
            return False
        waiter[0].wait()
        return waiter[1] != "declined"

    def read(self, adopt):
        """Reads the channel until it closes: adopts connections, wakes waiting hand-overs."""
        fd_size = struct.calcsize("i")
        try:
            self.send(ACCEPTING)
        except OSError:
            self.sock.close()
        while self.sock.fileno() >= 0:
            try:
                packet, ancillary, flags, _ = self.sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(4 * fd_size))
            except OSError:
                break
            fds = []
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % fd_size
                    fds += struct.unpack(f"{usable // fd_size}i", data[:usable])
            if not packet and not fds:
                break  # the supervisor closed its end
            if len(packet) < HEADER.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                continue
            magic, version, kind, ident, n_buffered, n_state = HEADER.unpack_from(packet)
            body = packet[HEADER.size:]
            if magic != MAGIC or version != VERSION or len(body) != n_buffered + n_state:
                for fd in fds:
                    os.close(fd)
                continue
            try:
                if kind == CONNECTION:
                    conn = socket.socket(fileno=fds.pop()) if len(fds) == 1 else None
                    if conn is None or conn.type != socket.SOCK_STREAM:
                        # No usable connection: whatever came is closed, and the giver keeps it.
                        if conn is not None:
                            conn.close()
                        self.send(DECLINED, ident)
                    else:
                        self.send(ADOPTED, ident)
                        adopt(conn, body[:n_buffered], body[n_buffered:])
                elif kind in (ADOPTED, DECLINED) and not fds:
                    with self.answers_lock:
                        waiter = self.answers.pop(ident, None)
                    if waiter:
                        waiter[1] = "adopted" if kind == ADOPTED else "declined"
                        waiter[0].set()
            except OSError:
                break
            finally:
                for fd in fds:
                    os.close(fd)
        # Closed: every hand-over still waiting hears "unknown", and no one waits again.
        with self.answers_lock:
            for waiter in self.answers.values():
                waiter[0].set()
            self.answers = None


class Sessions:
    """Counts live sessions: the drain is over when none is left."""

    def __init__(self):
        self.live = 0
        self.changed = threading.Condition()

    def start(self, *args):
        with self.changed:
            self.live += 1
        threading.Thread(target=self.run, args=args, daemon=True).start()

    def run(self, *args):
        try:
            session(*args)
        finally:
            with self.changed:
                self.live -= 1
                self.changed.notify_all()

    def wait_none(self):
        with self.changed:
            self.changed.wait_for(lambda: self.live == 0)


def session(conn, buffered, count, channel, me):
    handed = False
    try:
        while True:
            while b"\n" in buffered:
                _, buffered = buffered.split(b"\n", 1)
                count += 1
                conn.sendall(f"{count} gen {me}\n".encode())
            if len(buffered) > MAX_LINE:
                return
            if draining.is_set() and not handed:
                if channel and channel.hand_over(conn, buffered, str(count).encode()):
                    return
                handed = True  # no one took it: ours until the client is done
            readable, _, _ = select.select([conn], [], [], 0.05)
            if readable:
                data = conn.recv(65536)
                if not data:
                    return
                buffered += data
    except OSError:
        pass
    finally:
        conn.close()


def main():
    me = os.environ.get("HOTSWAP_GENERATION", "-")
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("pass me one listening socket (LISTEN_FDS=1): run me under `hotswap run`")
    listener = socket.socket(fileno=3)
    sessions = Sessions()
    channel = None
    if "HOTSWAP_HANDOFF_FD" in os.environ:
        channel = Channel(int(os.environ.pop("HOTSWAP_HANDOFF_FD")))

        def adopt(conn, buffered, state):
            conn.setblocking(True)
            sessions.start(conn, buffered, int(state or b"0"), channel, me)

        threading.Thread(target=channel.read, args=(adopt,), daemon=True).start()

    signal.signal(signal.SIGTERM, lambda *_: draining.set())
    listener.settimeout(0.05)
    while not draining.is_set():
        try:
            conn, _ = listener.accept()
        except (socket.timeout, InterruptedError):
            continue
        conn.setblocking(True)
        sessions.start(conn, b"", 0, channel, me)
    listener.close()
    sessions.wait_none()
    os._exit(0)


if __name__ == "__main__":
    main()
