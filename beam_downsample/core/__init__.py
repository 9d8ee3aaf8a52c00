"""Pure arithmetic, no I/O: mags, boxes, passes and the unit grid, pass configs, sizing, the machine's facts."""
