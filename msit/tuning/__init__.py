"""Architecture search: the Ray Tune edge."""
