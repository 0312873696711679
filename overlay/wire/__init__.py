"""Wire formats: one module per format, each with VERSION, MAX_SIZE, encode, decode."""
