"""Collective communication behind the platform seam."""
