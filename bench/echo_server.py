"""Baseline servers for bench/run.py, in plain Python on loopback. Run as its own process.

``--mode echo`` (the same-run baseline): a *threaded* server, one thread per connection, like the
reference projects' servers. Each request is one JSON object on one line; the server reads the line
(``BufferedReader.readline``: linear), ``json.loads`` it and answers with one JSON line written in one
``sendall``: ``{"status": "success", "result": {"pong": true}}`` (with the request's ``id`` echoed), or a
string of ``params.reply_bytes`` bytes when asked for one (the reply-size baseline). It does nothing
else, so it is the floor for "read a request, parse it, write a reply" in Python on this machine.

``--mode reference``: an emulation of the reference projects' headless approach (COMPAT.md): each
connection thread reads ``recv(8192)`` chunks and re-parses the whole buffer after every chunk until it
parses (quadratic in the request size), then hands the request to a "main thread" that polls a queue and
sleeps 0.05 s between polls (the ``sleep(0.05)`` keep-alive loop, ~50 ms per request).

Prints ``echo listening on 127.0.0.1:PORT (pid N)`` when ready; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import threading
import time

PONG = {"pong": True}


def reply_for(request: dict) -> bytes:
    params = request.get("params") or {}
    n = params.get("reply_bytes")
    out: dict = {"status": "success", "result": ("x" * n) if n else PONG}
    if "id" in request:
        out["id"] = request["id"]
    return json.dumps(out).encode() + b"\n"


def serve_echo(conn: socket.socket) -> None:
    with conn, conn.makefile("rb", buffering=1 << 16) as f:
        for line in f:
            if not line.strip():
                continue
            conn.sendall(reply_for(json.loads(line)))


# --- reference emulation -------------------------------------------------------------------------
JOBS: queue.Queue = queue.Queue()


def serve_reference(conn: socket.socket) -> None:
    with conn:
        buf = b""
        while True:
            chunk = conn.recv(8192)
            if not chunk:
                return
            buf += chunk
            try:
                request = json.loads(buf.decode("utf-8"))
            except ValueError:
                continue  # incomplete: read more and re-parse everything
            buf = b""
            slot: list = []
            done = threading.Event()
            JOBS.put((request, slot, done))
            done.wait()
            conn.sendall(slot[0])


def reference_main_loop() -> None:
    while True:
        while True:
            try:
                request, slot, done = JOBS.get_nowait()
            except queue.Empty:
                break
            slot.append(reply_for(request))
            done.set()
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["echo", "reference"], default="echo")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(512)
    target = serve_echo if args.mode == "echo" else serve_reference

    def accept() -> None:
        while True:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    print(f"echo listening on 127.0.0.1:{srv.getsockname()[1]} (pid {os.getpid()})", flush=True)
    if args.mode == "echo":
        accept()
    else:
        threading.Thread(target=accept, daemon=True).start()
        reference_main_loop()


if __name__ == "__main__":
    main()
