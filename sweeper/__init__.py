"""What to try and in what order: the search space, its validity rules, and the Hydra sweeper."""
