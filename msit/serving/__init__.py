"""Serving: the history store, the framework-free scorer, and the Ray Serve application."""
