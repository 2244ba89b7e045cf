"""Command-line entry point: argument parsing only, then calls the layers."""
