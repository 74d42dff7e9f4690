"""Command-line entry points: `main(argv) -> int` for each command."""
