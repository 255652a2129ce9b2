"""One small task module per system for `bench/peers.py`, each configured by `BENCH_*` env.

Every task does the same thing: one datagram to the benchmark's collector saying when its body
started (`common.notify`), then it returns its tag, so every system stores a result.
"""
