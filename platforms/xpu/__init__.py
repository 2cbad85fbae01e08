"""Intel XPU platform: torch.xpu (+ intel-extension-for-pytorch when installed), XCCL."""
