"""The study spec: pydantic models, YAML loading with flag overrides, and their messages."""
