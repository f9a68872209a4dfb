"""The two child processes as seen from both sides: liveness, timeouts, the serve loop.

Orchestrator side: `Peer` owns one child (a spawn-context Process) and its two queues
(requests in, replies out). Every wait is sliced into short `get`s; between slices the
child's and the watched peers' exit codes are checked, so a dead process is reported by
name and exit code ("client process died (exit code -9)") instead of a hang.

Child side: `serve()` runs the request loop: validate, dispatch, reply, and an error
reply (never a crash) for a bad request. The child ignores SIGINT (Ctrl-C reaches the
whole process group; the orchestrator decides) and exits by itself when its parent dies.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time

from ipc.messages import ProtocolError, RemoteError, error_reply, now_us, ok_reply, request, validate

SLICE_S = 0.05  # how often a waiting side looks at its peers' exit codes

# The queues are multiprocessing SimpleQueues (spawn context): a put writes straight into
# the pipe. mp.Queue hands every put to a feeder thread first, which costs ~60 us per hop
# on a 2-core machine (measured: 85-135 us vs 22-25 us per round trip) and would put the
# per-token IPC cost (two round trips) far above the 100 us budget.
# The orchestrator (only it: children spinning while idle starve the busy one on 2 cores)
# first spins on a non-blocking poll for up to SPIN_S before it sleeps in the kernel; a
# sleeping reader's wake-up is the main per-hop cost (measured per token: 180 us with
# the spin, 280 us without, on a loaded 2-core machine). Bounded: on a slow step (a real
# model) it costs at most SPIN_S of CPU per wait.
# On a machine with cores to spare (>= 8: a GPU server) every process spins for up to
# 10 ms, so a token's four hops cost no kernel wake-up at all (each one measured at
# ~250 us in a Firecracker VM on an H100 host: 6.5 vs 5.5 ms/token on Llama-2-7B shapes).
MANY_CORES = (os.cpu_count() or 1) >= 8
SPIN_S = float(os.environ.get("CASE4_IPC_SPIN_US", "10000" if MANY_CORES else "200")) / 1e6
CHILD_SPIN_S = SPIN_S if MANY_CORES else 0.0


def get(q, timeout: float, spin: float = 0.0):
    """q.get() with a timeout (raises queue.Empty), for a SimpleQueue with one reader."""
    r = q._reader
    if spin > 0 and not r.poll(0):
        t_end = time.perf_counter() + spin
        while not r.poll(0) and time.perf_counter() < t_end:
            pass
    if not r.poll(timeout):
        raise queue.Empty
    return q.get()


class PeerDied(RuntimeError):
    def __init__(self, name: str, exitcode):
        self.name, self.exitcode = name, exitcode
        super().__init__(f"{name} process died (exit code {exitcode})")


class PeerTimeout(RuntimeError):
    pass


def context():
    return mp.get_context("spawn")


class Peer:
    def __init__(self, name: str, target, args: tuple = (), ctx=None):
        ctx = ctx or context()
        self.name = name
        self.req, self.rep = ctx.SimpleQueue(), ctx.SimpleQueue()
        self.proc = ctx.Process(target=target, args=(self.req, self.rep, *args),
                                name=f"case4-{name}", daemon=True)
        self.next_id = 1
        self.on_progress = lambda text: print(f"[{name}] {text}", file=sys.stderr, flush=True)

    @property
    def pid(self):
        return self.proc.pid

    def start(self) -> "Peer":
        self.proc.start()
        return self

    def check(self) -> None:
        if self.proc.exitcode is not None:
            raise PeerDied(self.name, self.proc.exitcode)

    def send(self, op: str, args: dict | None = None) -> int:
        self.check()
        rid = self.next_id
        self.next_id += 1
        self.req.put(request(rid, op, args))
        return rid

    def recv(self, rid: int, timeout: float, watch: tuple["Peer", ...] = ()) -> dict:
        """The reply to request `rid` (0 = the start-up message)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = get(self.rep, max(0.0, min(SLICE_S, deadline - time.monotonic())), SPIN_S)
            except queue.Empty:
                for p in (self, *watch):
                    p.check()
                if time.monotonic() >= deadline:
                    raise PeerTimeout(f"{self.name} process did not answer request {rid} in {timeout:.0f} s")
                continue
            if "progress" in msg:
                self.on_progress(msg["progress"])
            elif msg.get("id") == rid:
                return msg
            # else: a late reply to a request we gave up on; drop it

    def call(self, op: str, args: dict | None = None, timeout: float = 60.0,
             watch: tuple["Peer", ...] = ()) -> dict:
        reply = self.recv(self.send(op, args), timeout, watch)
        if not reply["ok"]:
            raise RemoteError(self.name, op, reply["error"])
        return reply

    def stop(self, timeout: float = 3.0) -> None:
        """Ask politely, then terminate, then kill. Never blocks longer than ~timeout + 2 s."""
        if self.proc.pid is None:
            return
        if self.proc.exitcode is None:
            try:
                self.req.put(request(0, "stop"))
            except (ValueError, OSError):
                pass
            self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.terminate()
            self.proc.join(1.0)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(1.0)
        for q in (self.req, self.rep):
            q.close()


# ---- child side -------------------------------------------------------------------

def child_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def progress(rep, text: str) -> None:
    rep.put({"progress": text})


def serve(req, rep, ops: dict, handle, aliases: dict | None = None, poll_s: float = 0.5) -> None:
    """Answer requests until `stop` (or the parent's death). handle(op, args) -> dict."""
    while True:
        try:
            msg = get(req, poll_s, CHILD_SPIN_S)
        except queue.Empty:
            if not parent_alive():
                os._exit(0)
            continue
        t0 = now_us()
        rid = msg.get("id") if isinstance(msg, dict) else None
        try:
            rid, op, args = validate(msg, ops, aliases)
            result = handle(op, args)
            rep.put(ok_reply(rid, result if result is not None else {}, t0, now_us()))
        except Exception as e:  # every failure becomes an error reply; the loop goes on
            rep.put(error_reply(rid, e))
            continue
        if op == "stop":
            return


__all__ = ["Peer", "PeerDied", "PeerTimeout", "ProtocolError", "RemoteError", "context",
           "child_setup", "progress", "serve"]
