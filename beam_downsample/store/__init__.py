"""Storage: properties, paths local and gs://, array specs and opening, listings of what is stored, wkw, locks."""
