"""hyphae.cli"""
