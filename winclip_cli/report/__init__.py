"""The static HTML report of an output folder."""
