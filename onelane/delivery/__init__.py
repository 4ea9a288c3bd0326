"""Delivery: how a message gets from its queue to exactly one run, and back when a run dies.

The loss-proof fetch (``transport``, ``fetching``), the in-flight registry and requeue at
the head (``inflight``), pause and the delay set (``flow``), finding orphans (``recovery``),
the worker guard (``guard``), and the reaper that beat runs (``reaper``, ``scheduler``).
"""
