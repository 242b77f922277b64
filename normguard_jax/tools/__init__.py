"""Command-line tools that are not part of training (tiny random snapshots for dry runs)."""
