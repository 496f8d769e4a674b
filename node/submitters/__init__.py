"""Who may submit work: submitter keys, the owner-signed log of grants and revocations.

``keys``     text forms: the submitter key file, public keys, the mesh key file's owner line.
``log``      ``SubmitterLog``: the versioned, owner-signed log and who it authorizes (sans-I/O).
``store``    the disk: a person's submitter key (``default_key_path``) and a node's ``submitters.log``.
``service``  ``SubmitterService``: anti-entropy between members, the client's update and list.
"""
