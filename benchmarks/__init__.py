"""Benchmarks and ahead-of-time kernel reports. Run each as ``python -m benchmarks.<name>``."""
