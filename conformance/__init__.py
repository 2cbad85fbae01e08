"""heteroserve.conformance"""
