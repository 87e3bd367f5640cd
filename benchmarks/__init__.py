"""Benchmarks run by ``tersor bench``; one module per op family. Each registers functions with
``tersor.bench.register(family)`` that time a tersor op against the strongest baseline on the machine."""
