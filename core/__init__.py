"""The hardware-neutral engine core. Nothing here names a vendor or a device type."""
