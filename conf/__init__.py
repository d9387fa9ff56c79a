# Makes the Hydra config tree importable as `lemur_torch.conf` (see pyproject.toml), so an installed
# package finds its configs with `pkg://lemur_torch.conf` wherever it runs.
