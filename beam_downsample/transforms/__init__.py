"""Beam code: seeds expanded into work units, the DoFn that runs one unit (`work`), the pass transform."""
