"""Small helpers every part uses."""
