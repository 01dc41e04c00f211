"""The harness around the toolstack: `make demo`, `make e2e`, `make e2e-netns` and the network
namespaces the benchmark also uses. Not part of any executable; run with `python -m harness.X`."""
