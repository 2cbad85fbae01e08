"""CPU platform: torch-native kernels that also serve as the universal fallback."""
