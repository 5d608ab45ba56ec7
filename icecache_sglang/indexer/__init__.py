"""The CPU indexing process (per-head DCI trees behind ZeroMQ). Not built yet: see issue 3."""
