"""Benchmarks: one question per script, Markdown tables and JSON under reports/bench/."""
