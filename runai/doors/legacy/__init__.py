"""The legacy runai socket protocol: :mod:`~runai.doors.legacy.framing` (the packet codec,
sans-IO), :mod:`~runai.doors.legacy.protocol` (the Protocol: framing, limits,
backpressure), :mod:`~runai.doors.legacy.parse` (requests), :mod:`~runai.doors.legacy.replies`
(every reply's shape), :mod:`~runai.doors.legacy.session` (a connection's dispatch and
state), :mod:`~runai.doors.legacy.history` (the history actions),
:mod:`~runai.doors.legacy.factory` (connections, token, auto-shutdown)."""
