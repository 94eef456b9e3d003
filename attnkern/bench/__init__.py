"""Benchmark and memory tools (the ``attnkern bench`` / ``attnkern memory`` commands)."""
