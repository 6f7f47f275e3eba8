"""hyphae.kernels"""
