"""Worker-side parts of onelane: the guard that keeps one consumer per serial queue."""
