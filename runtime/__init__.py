"""pmnc.runtime: the supervisor, its forked workers and the CLI, built on pmnc.safe's public API."""
