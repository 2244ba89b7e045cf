"""Framed, checked messages between parties.

Modules, in dependency order:

- ``frame``     the wire header (documented next to the packing code) and numpy payloads.
- ``channel``   ``Channel`` (send/recv with deadlines, byte and message counters) and the
                in-process transport used by unit and protocol tests.
- ``tls``       TCP + mutual TLS 1.3 transport: connect with bounded retries, ``TlsChannel``.
- ``tls_listen``  the listening side: bind, a handshake thread per connection, ``Listener``,
                refusals that say why.
"""
