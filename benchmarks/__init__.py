"""The benchmark harness of ``actors``: ``python -m benchmarks --help``.

It measures, in one run on one machine: what SQLite itself allows on the
store's schema (raw apsw), ``actors`` end to end, latency at half load,
CPU per message, and peer libraries on the same workload; it prints a table
and writes JSON to ``benchmarks/results/``. Every scenario runs in a fresh
subprocess on a fresh database file in its own temporary directory, and every
figure is the median of interleaved rounds.

``python -m benchmarks.pg`` does the same on PostgreSQL against its peers;
``python -m benchmarks.http`` measures durable sends over HTTP (``actors
serve`` under wrk) against the HTTP stack's own ceiling.
"""
