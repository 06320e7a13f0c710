"""Benchmark maml-runner's MAML engine against learn2learn and higher: `python scripts/bench`."""
