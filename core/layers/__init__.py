"""Model building blocks that call the dispatch table, plus hardware-neutral helpers they share."""
