"""The Starmesh wire: frames, messages, handshake, encryption, tensor codecs. No I/O here."""
