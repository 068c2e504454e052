"""The worker side of ordered tasks: loaded only in worker processes, never by a web process that publishes.

One package per guarantee of ``docs/guarantees.rst``; ``docs/layout.rst``
maps each guarantee to its package and its tests.
"""
