"""Arrays to maps: pure numerical functions over numpy arrays."""
