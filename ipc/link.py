"""The direct server <-> client channel of the decode loop (docs/ipc.md "Decode loop").

With `--sampling client` the orchestrator starts one loop per generation (`decode_loop`
on the server, `sample_loop` on the client) and then only reads the client's stream;
each token costs one hop each way between the two children and no orchestrator hop:

    server: step -> logits into the shm ring -> to_client.put((loop, step))
    client: to_client.get() -> sample -> to_server.put((loop, token)) | (loop, None) = stop

Both queues are SimpleQueues made by the orchestrator and handed to both children at
spawn. `loop` is the orchestrator's id of the loop: a message of another loop (left over
from one that ended early) is dropped. (loop, None) from the server means it failed
(its own reply says why); ABORT, from the orchestrator, ends any loop at once: its
watchdog sends it when either child dies (the other one is blocked on this channel) and
the orchestrator on Ctrl-C or failure, so no blocked get waits on a dead peer.
(loop, CANCEL), from the orchestrator to the client, ends one loop early and cleanly (a stop
string matched or an HTTP client went away, conductor/serve.py): the client sends (loop,
None) to the server as after its last token, so the link stays usable.
"""
from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

ABORT = "abort"
CANCEL = "cancel"  # (loop, CANCEL) to the client, from the orchestrator: end this loop early


def put_marker(q, obj) -> None:
    """q.put(obj) from a third process (SimpleQueue.put takes the queue's write lock), but
    never stuck behind a write lock held by a child that was killed mid-put: after 1 s
    the holder is taken as dead and the message is written anyway."""
    data = ForkingPickler.dumps(obj)
    locked = q._wlock.acquire(timeout=1.0) if q._wlock is not None else False
    try:
        q._writer.send_bytes(data)
    except (OSError, ValueError):  # queue closed: nobody is waiting any more
        pass
    finally:
        if locked:
            q._wlock.release()


class Link:
    def __init__(self, ctx):
        self.to_client, self.to_server = ctx.SimpleQueue(), ctx.SimpleQueue()
        self.aborted = False

    def abort(self) -> None:
        """End whatever loop runs (orchestrator side, once: a stale ABORT would end the next
        loop, so a link is not used again after this)."""
        if self.aborted:
            return
        self.aborted = True
        put_marker(self.to_server, ABORT)
        put_marker(self.to_client, ABORT)

    def close(self) -> None:
        self.to_client.close()
        self.to_server.close()
