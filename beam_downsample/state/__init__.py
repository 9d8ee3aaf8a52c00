"""Run state that work units write next to the dataset: done-markers, worker state, progress tallies."""
