"""Weight loading: Hugging Face safetensors folders, or dummy weights of the real shapes."""
