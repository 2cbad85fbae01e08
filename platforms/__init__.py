"""Platform plugins shipped with heteroserve; each is loaded through the heteroserve.platforms entry-point group."""
