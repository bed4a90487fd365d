"""Test helpers for the operator: object builders, an in-memory API, the fake trainer."""
