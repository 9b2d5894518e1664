"""Test doubles and fault injection for fedquic, kept out of the installed package.

* :mod:`testkit.synthetic`: a numpy-only :class:`~testkit.synthetic.SyntheticLearner` and light client
  processes (``python -m testkit.synthetic``) for load, soak and crash tests and the round benchmark;
* :mod:`testkit.chaos`: a UDP relay that drops, delays, reorders, duplicates and corrupts datagrams
  (``python -m testkit.chaos``), since this kernel has no netem.

Importable from a checkout's root (pytest puts it on ``sys.path``: ``pythonpath`` in pyproject.toml; the
benchmarks and the commands in the docs run from the root).
"""
