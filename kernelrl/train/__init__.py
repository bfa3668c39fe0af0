"""The training loops (one linear script per algorithm) and the few pieces they share."""
