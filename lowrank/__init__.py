"""The low-rank-image library: what the scripts at the repository root share
(docs/architecture.md)."""
