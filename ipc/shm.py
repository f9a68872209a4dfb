"""Bulk data between the processes: fp32 logits in a ring of shared-memory slots.

Layout of the one block: int64 `step[slots]` followed by fp32 `logits[slots][vocab]`.
The server writes the logits of step s into slot s % slots and then records s in the
slot's header; the queue message carries only (slot, step). A reader checks the header
so it can never sample from a stale slot.

The orchestrator picks the block's name (case4_<pid>_<hex>) before it starts the server,
which creates it; the orchestrator unlinks it at the end whatever happened to the server.
"""
from __future__ import annotations

import secrets
from multiprocessing import shared_memory

import numpy as np


def new_name(pid: int) -> str:
    return f"case4_{pid}_{secrets.token_hex(4)}"


class LogitsChannel:
    def __init__(self, name: str, slots: int, vocab: int, create: bool = False):
        self.slots, self.vocab = slots, vocab
        size = 8 * slots + 4 * slots * vocab
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=size if create else 0)
        if self.shm.size < size:
            self.shm.close()  # (a refused attach keeps no mapping)
            raise ValueError(f"shared memory {name} is {self.shm.size} bytes, expected {size}")
        self.name = name
        self.steps = np.ndarray((slots,), dtype=np.int64, buffer=self.shm.buf, offset=0)
        self.logits = np.ndarray((slots, vocab), dtype=np.float32, buffer=self.shm.buf, offset=8 * slots)
        if create:
            self.steps[:] = -1

    def write(self, step: int, logits) -> int:
        """Copy fp32 logits [vocab] (numpy or CPU torch tensor) for `step`; return the slot."""
        slot = step % self.slots
        self.logits[slot] = np.asarray(logits, dtype=np.float32).reshape(-1)
        self.steps[slot] = step
        return slot

    def read(self, slot: int, step: int) -> np.ndarray:
        """A view (no copy) of the logits of `step`; raises if the slot holds another step."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range [0, {self.slots})")
        if self.steps[slot] != step:
            raise ValueError(f"slot {slot} holds step {int(self.steps[slot])}, not {step}")
        return self.logits[slot]

    def close(self) -> None:
        self.steps = self.logits = None  # drop the views before closing the mapping
        try:
            self.shm.close()
        except BufferError:
            pass


def unlink(name: str) -> bool:
    """Remove the block if it still exists; True when something was removed."""
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    shm.close()
    try:
        shm.unlink()
    except FileNotFoundError:
        return False
    return True
