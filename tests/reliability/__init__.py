"""Reliability suite: hostile checkpoints and images, training faults, concurrency and app hardening."""
