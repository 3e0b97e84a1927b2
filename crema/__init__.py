"""`crema`: the command-line front door. Subcommands import their packages only when they run."""
