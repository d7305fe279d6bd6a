"""Exported models: the format shared by the writer and predict, writing, verifying, loading."""
