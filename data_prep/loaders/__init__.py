"""Loaders from public formats into a ``RecDataset`` (see data_prep.dataset for the layout)."""
