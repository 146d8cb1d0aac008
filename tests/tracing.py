"""Counting how often jax traces a function: a retrace is a recompilation the tests want to rule out."""

import contextlib

import jax


@contextlib.contextmanager
def recorded_traces():
    """Yields a list that gets one entry (the event name) for every jaxpr jax traces inside the ``with`` block."""
    traces = []

    def listener(name, _secs, **_):
        if name.endswith("jaxpr_trace_duration"):
            traces.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traces
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
