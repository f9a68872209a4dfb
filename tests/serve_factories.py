"""Server factories for serve tests (CASE4_SERVER_FACTORY=tests.serve_factories:<name>): the real backend,
with one decision forced, in the spawned server process."""


def recompute_prefix(opts):
    """The reference backend, but its plan_keep always pre-fills the whole prompt again, as the cuda backend
    does where its start-up timings find a prompt's graph faster than the eager continuation."""
    from server.process import load
    model, backend = load({**opts, "factory": None})
    backend.plan_keep = lambda session, ids, keep: 0
    return model, backend
