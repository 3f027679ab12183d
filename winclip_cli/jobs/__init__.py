"""The jobs the commands run: each streams files through the core and writes through io."""
