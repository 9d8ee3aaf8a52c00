"""Block reductions: numpy kernels (`reduce`) and the compiled ones for 2-2-1 and 2-2-2 (`compiled`)."""
