"""hyphae.training"""
