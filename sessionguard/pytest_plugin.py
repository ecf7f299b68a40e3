"""pytest plugin for sessionguard (see docs/testing.md)."""
