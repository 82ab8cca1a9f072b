"""The fan-out benchmark: our own load generator (`bench.loadgen`) and the side-by-side runner (`bench.run`)."""
