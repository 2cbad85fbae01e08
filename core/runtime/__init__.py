"""Engine runtime: the scheduler process and the in-process client that talks to it."""
