"""Dense protocols beyond the linear probe: retrieval (hbird), overclustering, correspondence."""
