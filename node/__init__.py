"""hyphae.node"""
