"""whimbrel-audit: read a Whimbrel event log offline, verify it and explain it."""
