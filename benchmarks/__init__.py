"""Performance harness (`harness`) and its runner (`python -m benchmarks.run`); not installed with the package."""
