"""KV page allocation and the radix prefix cache."""
