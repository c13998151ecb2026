"""Helpers for the test suite, shipped with the package (as OLMo-core ships ``olmo_core.testing``)
so that tests and users' own tests import them by name instead of through ``sys.path``.

- ``distributed``: run a function in N gloo processes; gather TP shards into the master layout.
- ``tolerance``: the one tolerance rule for results computed in another fp32 operation order.
- ``variants``: the MTP head variants the parity tests sweep, and a tiny model shape.
- ``reference``: an independent plain-PyTorch forward of the trunk and heads (from equations).
- ``runs``: short training runs of the demo recipe at a tiny shape (overrides, a spawnable run).
- ``slurm_cluster``: a real SLURM cluster (munged, slurmctld, one slurmd per node) on this machine.

Nothing else in the package imports these (``tests/unit/test_imports.py``).
"""
