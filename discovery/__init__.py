"""Membership: SWIM gossip failure detection with the Lifeguard refinements. No I/O.

``Swim`` (discovery/swim.py) is a sans-I/O state machine: feed it messages and time, drain
``messages_to_send()`` and ``next_event()``, arm one timer at ``next_deadline()``.
"""
