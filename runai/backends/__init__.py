"""Back ends: where jobs run. :mod:`runai.backends.local` is a worker thread on this
machine that owns a device; the queue in front of the workers is :mod:`runai.core.queue`."""
