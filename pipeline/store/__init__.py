"""Store operations: building, refreshing and verifying stores; safe output writes."""
