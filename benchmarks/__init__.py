"""ctxkit's benchmark suite: ``python -m benchmarks`` (``make bench``, ``make bench-quick``).

Every case measures its variants in interleaved rounds (each variant once per round, in an
order shuffled per round from a recorded seed) and
reports, besides median and minimum time per operation, the median over rounds of each
variant's ratio to the baseline measured in the same round. On a shared machine the absolute
times drift from one minute to the next; the ratios are what to compare.
"""
