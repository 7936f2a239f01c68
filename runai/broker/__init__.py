"""Workers on other machines: jobs go through Redis Streams (``--broker``).

Nothing here is imported unless ``--broker`` is given: a server without it makes no
network connection. See docs/scale-out.md.
"""
