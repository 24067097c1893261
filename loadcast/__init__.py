"""loadcast"""
