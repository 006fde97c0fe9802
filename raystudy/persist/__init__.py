"""What an experiment keeps on storage and how it is read back: local paths and object stores
(`storage`), the trial record and the study manifest (`record`), a search's Optuna history
(`optuna_history`), older formats (`migrate`). No torch, no Ray."""
