"""Tools around the worker that are not the worker: the bench and its reference pipeline,
the demo, the contract generator, and spawning worker processes. The runtime (the other
modules of `worker`) never imports them; only the CLI's commands do."""
