"""Mixed per-layer weight bits: sensitivity probes, sizes on disk, budgets and the exact knapsack
that allocates bits under them."""
