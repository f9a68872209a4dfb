"""Server factories for serve tests (CASE4_SERVER_FACTORY=tests.serve_factories:<name>): the real backend,
with one decision forced, in the spawned server process."""


def recompute_prefix(opts):
    """The reference backend, but its plan_keep always pre-fills the whole prompt again, as the cuda backend
    does where its start-up timings find a prompt's graph faster than the eager continuation."""
    from server.process import load
    model, backend = load({**opts, "factory": None})
    backend.plan_keep = lambda session, ids, keep: 0
    return model, backend


def graphs_noop(opts):
    """The reference backend presenting itself as a graph backend whose capture ops do nothing (its replay already
    runs the step eagerly): the orchestrator's graph path (bg_capture_start, the pre-capture wait and its
    message, replay, bg_capture_stop) on the CPU."""
    from server.process import load
    model, backend = load({**opts, "factory": None})
    backend.supports_graphs = True
    backend.bg_capture_start = lambda session, window: {}
    backend.wait_precapture = lambda session, count, timeout_s=60.0: {}
    backend.bg_capture_stop = lambda session=-1: {}
    return model, backend
