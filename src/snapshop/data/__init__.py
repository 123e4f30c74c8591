"""Readers that turn folders, CSV manifests and public datasets into rows snapshop consumes."""
