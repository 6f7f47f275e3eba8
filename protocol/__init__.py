"""hyphae.protocol"""
