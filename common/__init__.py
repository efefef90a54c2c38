"""Small helpers every command shares."""
