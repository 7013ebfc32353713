"""The end-to-end demo application (`python -m launch.demo`, `make demo`)."""
