"""Blobs: a bounded content-addressed cache that peers fill from each other.

``fetch`` is the sans-I/O multi-source fetch core, ``store`` the on-disk store, ``service`` the
asyncio adapter. A blob's id is ``node.bundles.manifest.content_id`` of its bytes.
"""
