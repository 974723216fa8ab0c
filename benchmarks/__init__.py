"""sterling.benchmarks — the evaluation toolkit every benchmark, the demo and the tests share.

``sterling.benchmarks.evaluation``: exact top-k, recall, a tie-aware top-k
comparison, timers and percentiles, the filter evaluators of the roaring /
NumPy peers, and the machine facts a benchmark record names.
"""
