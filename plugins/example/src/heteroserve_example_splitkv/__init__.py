"""Example out-of-tree heteroserve plugin: split-KV ("flash-decoding") attention on cpu."""
