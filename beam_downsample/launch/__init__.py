"""The command line and its engines: flags, distribution strategies as Beam runners, clusters."""
