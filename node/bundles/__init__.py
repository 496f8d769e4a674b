"""Bundles: a task's code as a content-addressed archive of files.

``manifest`` packs and checks archives and names them by content id (sans-I/O); ``store``
packs a directory from disk and keeps a bounded cache of unpacked bundles.
"""
