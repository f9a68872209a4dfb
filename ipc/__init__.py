"""The protocol between the orchestrator, the server and the client (docs/ipc.md).

messages.py  request/reply records, per-op argument specs, validation
shm.py       the shared-memory logits ring (queues carry only slot + step)
peers.py     child processes with liveness checks and timeouts; the child's serve loop
"""
