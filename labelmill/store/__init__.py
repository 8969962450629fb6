"""Output tables, commits, dataset versions and the read API."""
