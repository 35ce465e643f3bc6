"""The GPU suite: ``python -m benchmarks.gpu.suite`` (its docstring says how a GPU machine runs it)."""
