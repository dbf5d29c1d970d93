"""The pieces of ``benchmarks/signal_fidelity.py``: its plan, candidates, scoring, analysis and section."""
