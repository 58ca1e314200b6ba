"""Command-line tools: compile-check, sweep and bench (installed as ``dynconv.autotune``)."""
