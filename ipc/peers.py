"""The two child processes as seen from both sides: liveness, timeouts, the serve loop.

Orchestrator side: `Peer` owns one child (a spawn-context Process) and its two queues
(requests in, replies out). A waiting `recv` blocks in a plain `q.get()` (no timeout,
no poll); liveness and timeouts are the job of one watchdog thread per orchestrator
process, which sleeps on the children's sentinels and, when a child dies or a wait's
deadline passes, wakes the blocked reader by putting a marker into its reply queue. So a
dead process is still reported by name and exit code ("client process died (exit code
-9)") instead of a hang, and the hot path costs one blocking read per hop.

Child side: `serve()` runs the request loop: validate, dispatch, reply, and an error
reply (never a crash) for a bad request, including bytes that do not unpickle. The child ignores SIGINT (Ctrl-C reaches the
whole process group; the orchestrator decides) and exits by itself when its parent dies
(a daemon thread waits on the parent's sentinel).
"""
from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
import select
import signal
import sys
import threading
import time
from multiprocessing.connection import wait as wait_ready
from multiprocessing.reduction import ForkingPickler

from ipc.link import put_marker
from ipc.messages import ProtocolError, RemoteError, error_reply, now_us, ok_reply, request, validate

SLICE_S = 0.05  # how late the watchdog may notice a passed deadline (deaths: at once)

# The queues are multiprocessing SimpleQueues (spawn context): a put writes straight into
# the pipe. mp.Queue hands every put to a feeder thread first, which costs ~60 us per hop
# on a 2-core machine (measured: 85-135 us vs 22-25 us per round trip) and would put the
# per-token IPC cost (two round trips) far above the 100 us budget.
# Every read is a plain blocking q.get(): a poll(timeout) before each get (how timeouts
# were done before the watchdog) cost another ~17-30 us per round trip on a 2-core VM.
# The orchestrator (only it: children spinning while idle starve the busy one on 2 cores)
# first spins on a non-blocking poll for up to SPIN_S before it sleeps in the kernel; a
# sleeping reader's wake-up is the main per-hop cost. Bounded: on a slow step (a real
# model) it costs at most SPIN_S of CPU per wait. With one usable CPU (taskset -c 0) a
# spin can only delay the process being waited for, so it is 0 there whatever is asked.
# On a machine with cores to spare (>= 8: a GPU server) every process spins for up to
# 10 ms, so a token's four hops cost no kernel wake-up at all (each one measured at
# ~250 us in a Firecracker VM on an H100 host: 6.5 vs 5.5 ms/token on Llama-2-7B shapes).
try:
    NCPU = len(os.sched_getaffinity(0))
except AttributeError:  # not Linux
    NCPU = os.cpu_count() or 1
MANY_CORES = NCPU >= 8
# A value of CASE4_IPC_SPIN_US / CASE4_LOOP_SPIN_US that is not a number of microseconds >= 0 is
# noted here (this module loads before any argument is checked) and refused by the CLI's checks
# (conductor/cli.py check_model_options: exit 2, one line); the default stands meanwhile.
BAD_ENV: list[str] = []


def _spin_us(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        us = float(raw)
    except ValueError:
        us = math.nan
    if not 0 <= us < math.inf:
        BAD_ENV.append(f"{name} must be a number of microseconds >= 0, got '{raw}'")
        return default
    return us


SPIN_S = 0.0 if NCPU == 1 else _spin_us("CASE4_IPC_SPIN_US", 10000.0 if MANY_CORES else 200.0) / 1e6
CHILD_SPIN_S = SPIN_S if MANY_CORES else 0.0
# The decode loop's reads (server and client waiting on each other over ipc/link.py) spin
# as long as the orchestrator's: there the orchestrator sleeps (it only takes a batch of
# tokens every ~10 ms), so the two children are the only busy processes and, on 2 cores,
# a spinning reader sees the other's message without a cross-CPU wake-up (measured on a
# 2-core VM, no-op step: ~95-155 us/token without the spin, ~39-56 with 200 us).
LOOP_SPIN_S = 0.0 if NCPU == 1 else _spin_us("CASE4_LOOP_SPIN_US", SPIN_S * 1e6) / 1e6


def _spin(q, spin: float) -> bool:
    """Spin up to `spin` s on a non-blocking poll until q (a SimpleQueue, one reader) has data;
    True when it has (False: not known to have)."""
    if spin > 0:
        r = q._reader
        t_end = time.perf_counter() + spin
        while True:
            if r.poll(0):
                return True
            if time.perf_counter() >= t_end:
                return False
    return False


def spin_get(q, spin: float = 0.0, timeout: float | None = None):
    """q.get() after spinning up to `spin` s on a non-blocking poll (SimpleQueue, one reader).
    timeout: seconds to wait after the spin before TimeoutError (None: forever). It costs one
    poll(2) on the fd, and only when the spin found nothing (the reader would sleep in the
    kernel anyway): Connection.poll(timeout) builds a selector per call, which is what made
    a poll before each get cost ~10 us a hop (docs/ipc.md "Queues")."""
    if not _spin(q, spin) and timeout is not None:
        p = select.poll()
        p.register(q._reader.fileno(), select.POLLIN)
        if not p.poll(max(0, int(math.ceil(timeout * 1000)))):
            raise TimeoutError(f"nothing came in {timeout:g} s")
    return q.get()


class PeerDied(RuntimeError):
    def __init__(self, name: str, exitcode):
        self.name, self.exitcode = name, exitcode
        super().__init__(f"{name} process died (exit code {exitcode})")


class PeerTimeout(RuntimeError):
    pass


class PeerStalled(PeerTimeout):
    """A child alive but silent during a running decode loop (StallGuard)."""

    def __init__(self, name: str, silent_s: float, why: str):
        self.name, self.silent_s, self.why = name, silent_s, why
        super().__init__(f"{name} process stalled (no step for {silent_s:.1f} s during decode; {why})")


# Stall detection in the decode loop (docs/ipc.md "Stalls"): once the loop has produced two
# tokens, silence on the client's stream longer than max(STALL_MIN_S, STALL_STEPS x the
# slowest token gap seen) ends the wait (never later than --timeout). The floor keeps a
# scheduling hiccup on a loaded machine or an eager step after a graph miss from counting.
STALL_MIN_S = 3.0
STALL_STEPS = 50


def proc_state(pid) -> str:
    """The one-letter state of a process (/proc/<pid>/stat: R running, S sleeping, D disk,
    T stopped, t traced, Z zombie), or "" when it cannot be read (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return ""


class StallGuard:
    """The deadline on silence while a decode loop runs, and who to blame when it passes.

    note() takes the sampling times the client streams; limit() is the silence allowed now
    (`timeout` until two tokens have been seen); error() names the stalled child, in this
    order (docs/ipc.md "Stalls"): one that is stopped (state T/t: SIGSTOP, a debugger);
    else the reader of a link queue that holds an unread message (its peer made progress,
    it did not); else one that is running (state R/D) while the other sleeps in its read;
    else the server, which does the step (the client's part only reads shared memory)."""

    def __init__(self, server, client, link, floor_s: float = STALL_MIN_S, steps: int = STALL_STEPS):
        self.server, self.client, self.link = server, client, link
        self.floor_s, self.steps = floor_s, steps
        self.slowest = None  # seconds: the longest gap between two consecutive tokens
        self._last = None

    def note(self, t_us) -> None:
        for t in t_us:
            if self._last is not None:
                gap = max(0.0, (t - self._last) / 1e6)
                self.slowest = gap if self.slowest is None else max(self.slowest, gap)
            self._last = t

    @property
    def running(self) -> bool:
        return self.slowest is not None

    def limit(self, timeout: float) -> float:
        if self.slowest is None:
            return timeout
        return min(timeout, max(self.floor_s, self.steps * self.slowest))

    def culprit(self) -> tuple[str, str]:
        kids = (self.server, self.client)
        state = {p.name: proc_state(p.pid) for p in kids}
        for p in kids:
            if state[p.name] in ("T", "t"):
                return p.name, f"it is stopped, state {state[p.name]}: SIGSTOP or a debugger"
        for p, q in ((self.server, self.link.to_server), (self.client, self.link.to_client)):
            try:
                pending = q._reader.poll(0)
            except (OSError, ValueError):
                pending = False
            if pending:
                return p.name, "a message waits unread on its link"
        busy = [p for p in kids if state[p.name] in ("R", "D")]
        if len(busy) == 1:
            return busy[0].name, f"it is busy (state {state[busy[0].name]}) while the other waits"
        return "server", f"no message waits on the link (states: server {state['server'] or '?'}, " \
                         f"client {state['client'] or '?'})"

    def error(self, silent_s: float) -> PeerStalled:
        name, why = self.culprit()
        return PeerStalled(name, silent_s, why)


def context():
    return mp.get_context("spawn")


WAKE = "_wake"  # key of the watchdog's marker in a reply queue; children never send it


class _Wait:
    """One blocked recv: the peer read from, the peers whose death ends it, its deadline."""
    __slots__ = ("peer", "peers", "deadline", "token", "woken")

    def __init__(self, peer, peers, deadline, token):
        self.peer, self.peers, self.deadline, self.token, self.woken = peer, peers, deadline, token, False


class _Watchdog:
    """One daemon thread per orchestrator process. It sleeps on the sentinels of the started
    peers (ready = that process has exited) for at most SLICE_S, then wakes each blocked
    recv that involves a dead peer or whose deadline has passed, once, by putting
    {WAKE: token} into that peer's reply queue. recv ignores a marker whose token is not
    its current wait's (left over from a wait that ended otherwise). When a peer dies it
    also aborts the server <-> client links (ipc/link.py) that peer is on, so the other
    child, blocked on the link, is woken too."""

    def __init__(self):
        self.lock = threading.Lock()
        self.peers: set = set()   # started and not stopped
        self.dead: set = set()    # of those, the ones whose sentinel has fired
        self.waits: dict = {}     # id(peer) -> _Wait
        self.links: list = []     # [link, peers]: aborted once when one of the peers dies
        self.tokens = itertools.count(1)
        self.thread = None

    def add(self, peer) -> None:
        with self.lock:
            self.peers.add(peer)
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="case4-ipc-watchdog", daemon=True)
                self.thread.start()

    def remove(self, peer) -> None:
        with self.lock:
            self.peers.discard(peer)
            self.dead.discard(peer)
            self.waits.pop(id(peer), None)
            self.links = [lp for lp in self.links if peer not in lp[1]]

    def add_link(self, link, peers) -> None:
        with self.lock:
            self.links.append((link, tuple(peers)))

    def arm(self, peer, peers, deadline) -> _Wait:
        w = _Wait(peer, peers, deadline, next(self.tokens))
        with self.lock:
            self.waits[id(peer)] = w
        return w

    def rearm(self, w: _Wait) -> None:
        with self.lock:
            w.woken = False

    def disarm(self, peer) -> None:
        with self.lock:
            self.waits.pop(id(peer), None)

    def run(self) -> None:
        while True:
            with self.lock:
                live = {p.proc.sentinel: p for p in self.peers if p not in self.dead}
            if live:
                ready = wait_ready(list(live), SLICE_S)
            else:
                time.sleep(SLICE_S)
                ready = ()
            now = time.monotonic()
            with self.lock:
                self.dead.update(live[s] for s in ready if live[s] in self.peers)
                for w in self.waits.values():
                    if not w.woken and (now >= w.deadline or any(p in self.dead for p in w.peers)):
                        w.woken = True
                        _wake(w.peer.rep, w.token)
                for lp in [lp for lp in self.links if any(p in self.dead for p in lp[1])]:
                    self.links.remove(lp)  # the survivor may be blocked on the link: wake it
                    lp[0].abort()


def _wake(q, token: int) -> None:
    """q.put({WAKE: token}) from the orchestrator's side (ipc/link.py put_marker: never stuck
    behind a write lock held by a child killed mid-put)."""
    put_marker(q, {WAKE: token})


_WATCHDOG = _Watchdog()


def watch_link(link, peers) -> None:
    """Abort `link` (wake the child blocked on it) as soon as one of `peers` dies."""
    _WATCHDOG.add_link(link, peers)


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
        _WATCHDOG.add(self)
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

    def recv(self, rid: int, timeout: float, watch: tuple["Peer", ...] = (), on_stream=None,
             stall: StallGuard | None = None, spin: float | None = None) -> dict:
        """The reply to request `rid` (0 = the start-up message). Blocks in a plain get();
        the watchdog wakes it if this peer or one in `watch` dies, or after `timeout` s
        without a message: each progress or stream message ({"stream": ...}, handed to
        on_stream, from a long op such as sample_loop) starts the timeout again. With
        `stall` (a running decode loop) the silence allowed is stall.limit(timeout), and
        its passing raises stall.error(): PeerStalled naming the stalled child. spin: how long
        each read spins before it sleeps (None: SPIN_S)."""
        spin = SPIN_S if spin is None else spin
        limit = stall.limit(timeout) if stall is not None else timeout
        w = _WATCHDOG.arm(self, (self, *watch), time.monotonic() + limit)
        try:
            while True:
                msg = spin_get(self.rep, spin)
                if WAKE in msg:
                    if msg[WAKE] == w.token:
                        self._woken(w, rid, limit, stall)  # raises, or re-arms if nothing holds
                    continue  # a stale marker from an earlier wait
                if "stream" in msg and on_stream is not None:
                    on_stream(msg["stream"])
                elif "progress" in msg:
                    self.on_progress(msg["progress"])
                elif msg.get("id") == rid:
                    return msg
                else:
                    continue  # a late reply to a request we gave up on; drop it
                if stall is not None:
                    limit = stall.limit(timeout)
                w.deadline = time.monotonic() + limit
        finally:
            _WATCHDOG.disarm(self)

    def _woken(self, w: _Wait, rid: int, timeout: float, stall: StallGuard | None) -> None:
        for p in w.peers:
            if p.proc.pid is not None and wait_ready([p.proc.sentinel], 0):
                p.proc.join(1.0)  # it has exited: reap it so exitcode is set
            p.check()
        if time.monotonic() >= w.deadline:
            if stall is not None and stall.running:
                raise stall.error(timeout)
            raise PeerTimeout(f"{self.name} process did not answer request {rid} in {timeout:.0f} s")
        _WATCHDOG.rearm(w)

    def call(self, op: str, args: dict | None = None, timeout: float = 60.0,
             watch: tuple["Peer", ...] = ()) -> dict:
        reply = self.recv(self.send(op, args), timeout, watch)
        if not reply["ok"]:
            raise RemoteError(self.name, op, reply["error"])
        return reply

    def stop(self, timeout: float = 3.0) -> None:
        """Ask politely, then terminate, then kill. Never blocks longer than ~timeout + 2 s."""
        _WATCHDOG.remove(self)
        if self.proc.pid is None:
            return
        if self.proc.exitcode is None and proc_state(self.proc.pid) in ("T", "t"):
            self.proc.kill()  # stopped: it cannot answer, and SIGTERM stays pending until SIGCONT
            self.proc.join(1.0)
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


def watch_parent() -> None:
    """Exit (os._exit(0)) as soon as the parent process is gone: a daemon thread blocks on
    the parent's sentinel, so the request loop itself can block in a plain get()."""
    parent = mp.parent_process()
    if parent is None:
        return

    def run():
        wait_ready([parent.sentinel])
        os._exit(0)
    threading.Thread(target=run, name="case4-parent-watch", daemon=True).start()


def progress(rep, text: str) -> None:
    rep.put({"progress": text})


class _PipeClosed(Exception):
    pass


def _get_request(req):
    """spin_get(req, CHILD_SPIN_S), with the pipe read and the unpickling apart: a message that
    does not unpickle (raw bytes, a class this process cannot import) is consumed and raises
    ProtocolError, to be answered; only a closed pipe ends the loop (EOFError / OSError from
    the read: pickle raises EOFError too, on a truncated payload)."""
    _spin(req, CHILD_SPIN_S)
    try:
        with req._rlock:
            data = req._reader.recv_bytes()
    except (EOFError, OSError) as e:
        raise _PipeClosed(str(e)) from e
    try:
        return ForkingPickler.loads(data)
    except Exception as e:
        raise ProtocolError(f"unreadable request ({type(e).__name__}: {e})") from None


def serve(req, rep, ops: dict, handle, aliases: dict | None = None) -> None:
    """Answer requests until `stop` (or the parent's death). handle(op, args) -> dict."""
    watch_parent()
    while True:
        rid = None
        try:
            msg = _get_request(req)
            t0 = now_us()
            rid = msg.get("id") if isinstance(msg, dict) else None
            rid, op, args = validate(msg, ops, aliases)
            result = handle(op, args)
            rep.put(ok_reply(rid, result if result is not None else {}, t0, now_us()))
        except _PipeClosed:
            return  # the orchestrator is gone (watch_parent exits the process too)
        except Exception as e:  # every failure becomes an error reply; the loop goes on
            rep.put(error_reply(rid, e))
            continue
        if op == "stop":
            return


__all__ = ["Peer", "PeerDied", "PeerStalled", "PeerTimeout", "StallGuard", "ProtocolError", "RemoteError", "context",
           "child_setup", "progress", "serve", "spin_get", "watch_link", "LOOP_SPIN_S"]
