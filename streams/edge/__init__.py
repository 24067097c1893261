"""streams.edge"""
