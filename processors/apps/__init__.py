"""processors.apps"""
