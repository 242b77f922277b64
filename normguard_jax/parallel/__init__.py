"""Mesh, the logical-axis rules table, sharding helpers and multi-host initialisation (DESIGN.md §5)."""
