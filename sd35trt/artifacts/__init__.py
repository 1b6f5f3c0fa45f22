"""What stages write and read back: run manifest, typed records, engine manifest, locks, packaging."""
