"""Test helpers shipped with autotransfer, for plugin authors (needs pytest)."""
