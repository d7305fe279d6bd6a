"""The plugin host: entry points, allow and deny lists, the typed facade over the hooks."""
