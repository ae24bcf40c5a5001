"""Benchmark harness: named scenarios on real data, our learners and peer methods side by side."""
