"""Flow-matching time grids, training-timestep samplers and samplers (DESIGN.md §1)."""
