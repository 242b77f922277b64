"""Data sources: the bundled scikit-learn digits for the CPU default."""
