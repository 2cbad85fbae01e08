"""heteroserve.server"""
