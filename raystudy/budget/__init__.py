"""What a study costs before it runs: time (`costs`) and GPU memory (`memory`). No torch, no Ray."""
