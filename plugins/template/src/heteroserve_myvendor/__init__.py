"""heteroserve platform plugin for MyVendor accelerators (template)."""
